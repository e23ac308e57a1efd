//! tracing setup: stderr, `-v`/`-q`, `BOOTSTRAP_LOG` directives, no timestamps under systemd.

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init(verbose: u8, quiet: u8) {
    let level = match (verbose as i8) - (quiet as i8) {
        i8::MIN..=-1 => Level::ERROR,
        0 => Level::WARN,
        1 => Level::INFO,
        2 => Level::DEBUG,
        _ => Level::TRACE,
    };
    // `BOOTSTRAP_LOG`: `target=level` directives (`bootstrap=debug,warn`); unset or invalid,
    // the -v/-q level for the agent and warnings for its libraries.
    let filter = std::env::var("BOOTSTRAP_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_target("bootstrap", level).with_default(Level::WARN));
    let builder = tracing_subscriber::fmt()
        .with_writer(|| crate::secrets::Redacting(std::io::stderr()))
        .with_target(false);
    // The journal stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).finish().with(filter).init();
    } else {
        builder.finish().with(filter).init();
    }
}
