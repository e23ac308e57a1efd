//! tracing setup: stderr, `-v`/`-q`, `BOOTSTRAP_LOG` directives, no timestamps under systemd.

use tracing_subscriber::EnvFilter;

pub fn init(verbose: u8, quiet: u8) {
    let level = match (verbose as i8) - (quiet as i8) {
        i8::MIN..=-1 => "error",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("BOOTSTRAP_LOG").unwrap_or_else(|_| EnvFilter::new(format!("bootstrap={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::secrets::Redacting(std::io::stderr()))
        .with_target(false);
    // The journal stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.init();
    }
}
