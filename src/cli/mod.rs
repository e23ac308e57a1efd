//! Command line (clap): one file per subcommand.

pub mod apply;
pub mod bundle;
pub mod facts;
pub mod fleet;
pub mod init;
pub mod lock;
pub mod reboot;
pub mod rollout;
pub mod validate;
pub mod watch;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "bootstrap", version, about = "Node bootstrap agent for EC2 fleets: converge this node to its role")]
pub struct Cli {
    /// More log output (-v info, -vv debug); BOOTSTRAP_LOG takes tracing directives.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// First boot: facts, user-data config, bundle, apply, install the agent's units, then
    /// write /var/lib/bootstrap/firstboot.done.
    Init(RunArgs),
    /// Converge this node to its role.
    Apply(RunArgs),
    /// Read-only: show per step what apply would change, with unified diffs for files.
    Plan(RunArgs),
    /// Offline lint of a roles bundle (a directory holding roles/, or a bundle tarball).
    Validate {
        /// Bundle root (the directory that holds roles/) or a .tar.gz bundle.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Role bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Only the reboot part: is a reboot needed, take a slot, hooks, reboot (or release after one).
    Reboot {
        /// Only say whether a reboot is needed.
        #[arg(long, conflicts_with = "request")]
        check: bool,
        /// Ask for a coordinated reboot on the next run.
        #[arg(long)]
        request: bool,
        /// Block until a slot is free (queued, no polling) or the reboot window ends, instead of
        /// trying once.
        #[arg(long, conflicts_with_all = ["check", "request"])]
        wait: bool,
        /// How long to wait for a running apply to finish (the run lock).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        lock_timeout: std::time::Duration,
        #[command(flatten)]
        naming: NamingArgs,
    },
    /// Write the man page (roff) or shell completions to stdout (packaging uses these).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateCmd,
    },
    /// Operator tools for the fleet reboot semaphore in etcd.
    Lock {
        #[command(subcommand)]
        cmd: LockCmd,
        /// The reboot group (default: [reboot] group, else ENV-SERVICE of this node).
        #[arg(long, global = true)]
        group: Option<String>,
        #[command(flatten)]
        naming: NamingArgs,
    },
    /// Rollouts of new bundles in the group (`[rollout] strategy = "canary"`).
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
        /// The rollout group (default: [rollout] group, else ENV-SERVICE of this node).
        #[arg(long, global = true)]
        group: Option<String>,
        #[command(flatten)]
        naming: NamingArgs,
    },
    /// The fleet view: what every node runs, from the records nodes put in etcd after each run.
    Fleet {
        #[command(subcommand)]
        cmd: FleetCmd,
        /// Only this group (default: every group under the etcd prefix).
        #[arg(long, global = true)]
        group: Option<String>,
        #[command(flatten)]
        naming: NamingArgs,
    },
    /// Wait for this instance's Auto Scaling group to terminate it, then drain it, give back
    /// its reboot slot and complete the terminating lifecycle action (bootstrap-watch.service).
    Watch {
        /// Look once: drain if the instance is being terminated, else exit.
        #[arg(long)]
        once: bool,
        /// Treat DIR as the system's root.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Print the facts templates and `when` see.
    Facts {
        #[command(flatten)]
        naming: NamingArgs,
        #[arg(long, value_enum, default_value_t = FactsFormat::Json)]
        format: FactsFormat,
        /// Treat DIR as the system's root.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Build a reproducible bundle tarball of DIR/roles, with FILE.sha256 (and FILE.minisig).
    Build {
        /// Bundle root: the directory that holds roles/.
        dir: PathBuf,
        /// The tarball to write (e.g. roles-production.tar.gz).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Sign with this minisign secret key (password, if any, in BOOTSTRAP_SIGN_PASSWORD).
        #[arg(long, value_name = "SECRET_KEY")]
        sign: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GenerateCmd {
    /// bootstrap(1) in roff.
    Man,
    /// Completions for a shell.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum LockCmd {
    /// Show the semaphore: slots and holders.
    Status,
    /// Free the slot held by ID (an instance id, or a machine id off EC2).
    Release { id: String },
    /// Set the number of slots.
    SetSlots { n: u64 },
    /// Remove holders whose EC2 instance is terminated or unknown (ec2:DescribeInstanceStatus;
    /// an id unknown to this region is looked for in the other regions first).
    Reap,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Each bundle in flight: state, nodes applied/healthy/failed, the halt reason.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Lift a halt: the bundle goes on (the node that halted it tries again first).
    Resume { sha256: String },
    /// Mark the bundle bad: no node applies it, nodes that applied it go back to their good
    /// bundle before it.
    Abort { sha256: String },
    /// Give back the rollout slots of holders whose EC2 instance is terminated or unknown
    /// (ec2:DescribeInstanceStatus; an id unknown to this region is looked for in the other
    /// regions first); ids that are not instance ids are kept. For cron, like `lock reap`.
    Reap,
    /// Give back every rollout slot HOLDER holds in the group (a node that will not come back).
    Release { holder: String },
}

#[derive(Debug, Subcommand)]
pub enum FleetCmd {
    /// Groups, nodes per bundle and status, nodes not reporting, rollouts and reboots in flight.
    Status {
        #[arg(long)]
        json: bool,
        /// Read the records nodes put in S3 (`[report] s3`) under this prefix instead of etcd.
        #[arg(long, value_name = "s3://BUCKET/PREFIX/")]
        source: Option<String>,
        /// With --source: a record older than this is a node not reporting (default:
        /// `[report] ttl`, 90m).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "source")]
        stale: Option<std::time::Duration>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FactsFormat {
    Json,
    Env,
    Text,
}

#[derive(Debug, Args, Clone, Default)]
pub struct NamingArgs {
    /// The role (service) to apply.
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// The environment (selects env/<ENV>.toml overlays).
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// ENV-SERVICE, split at the first '-' (production-haproxy).
    #[arg(long, value_name = "ENV-SERVICE")]
    pub name: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub naming: NamingArgs,
    /// Where the roles come from: a directory holding roles/, or file:///path/to/dir.
    #[arg(long, value_name = "DIR|URL")]
    pub source: Option<String>,
    /// Treat DIR as the system's root (tests, image builds).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Exit 2 when changes were made, 4 on failure, 6 on both (0: no changes).
    #[arg(long)]
    pub detailed_exitcodes: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for another run to finish (apply only).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub lock_timeout: std::time::Duration,
}

/// Run a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Init(a) => init::run(&a),
        Command::Apply(a) => apply::run(&a, crate::engine::Mode::Apply),
        Command::Plan(a) => apply::run(&a, crate::engine::Mode::Plan),
        Command::Validate { path } => validate::run(&path),
        Command::Bundle(BundleCmd::Build { dir, output, sign }) => bundle::build(&dir, &output, sign.as_deref()),
        Command::Reboot {
            check,
            request,
            wait,
            lock_timeout,
            naming,
        } => reboot::run(check, request, wait, lock_timeout, &naming),
        Command::Lock { cmd, group, naming } => lock::run(&cmd, group.as_deref(), &naming),
        Command::Rollout { cmd, group, naming } => rollout::run(&cmd, group.as_deref(), &naming),
        Command::Fleet { cmd, group, naming } => fleet::run(&cmd, group.as_deref(), &naming),
        Command::Watch { once, root } => watch::run(once, root.as_deref()),
        Command::Facts { naming, format, root } => facts::run(&naming, format, root.as_deref()),
        Command::Generate { what } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            match what {
                GenerateCmd::Man => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
                GenerateCmd::Completions { shell } => clap_complete::generate(shell, &mut cmd, "bootstrap", &mut std::io::stdout()),
            }
            Ok(0)
        }
    }
}
