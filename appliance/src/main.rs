//! `talkbox`: the command line of the appliance. Parses arguments and hands over to the
//! library; errors meet the user here, as one clear message and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use appliance::config::{Config, DataDir, reference_markdown};
use appliance::service::Service;
use appliance::supervisor::{self, RunOptions, control};
use appliance::{logging, storage};

/// Exit code for a config that does not validate (as `talkbox config check` documents).
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "talkbox",
    version,
    about = "Video-call appliance: Nextcloud Talk HPB signaling, SFU, TURN and setup page, run by one supervisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Paths {
    /// Directory for config, secrets, certificates and runtime sockets.
    #[arg(long, env = "TALKBOX_DATA_DIR", default_value = "./talkbox-data")]
    data_dir: PathBuf,
    /// Config file (default: DATA_DIR/talkbox.toml if it exists, else built-in defaults).
    #[arg(long, env = "TALKBOX_CONFIG")]
    config: Option<PathBuf>,
}

impl Paths {
    fn options(&self) -> RunOptions {
        RunOptions {
            data: DataDir::new(&self.data_dir),
            config: self.config.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor and every service (what the appliance boots into).
    Run(Paths),
    /// Run the signaling service (normally started by `run`).
    Signaling(Paths),
    /// Run the SFU media service (normally started by `run`).
    Sfu(Paths),
    /// Run the STUN/TURN service (normally started by `run`).
    Turn(Paths),
    /// Run the setup page service (normally started by `run`).
    Web(Paths),
    /// Run the provisioning push API service (normally started by `run`).
    Provision(Paths),
    /// Open a new one-time enrolment token for `talkbox-provision push` (replacing any open
    /// one) and print it with the box id and the certificate fingerprint to pin.
    EnrolToken {
        #[command(flatten)]
        paths: Paths,
        /// How long the token stays valid (90s, 30m, 12h, 7d).
        #[arg(long, default_value = "24h")]
        valid_for: String,
    },
    /// Show the state of every service of a running supervisor.
    Status {
        #[command(flatten)]
        paths: Paths,
        /// Print JSON for machines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check, install or document the config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// What the box can send (link speed, declared uplink, a measurement against a peer) and
    /// the limits that follow: egress budget and participants per room.
    Sizing(SizingArgs),
    /// Print the version.
    Version,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct SizingArgs {
    #[command(subcommand)]
    action: Option<SizingAction>,
    #[command(flatten)]
    paths: Paths,
    /// Measure against this peer (a talkbox or `talkbox sizing sink`) instead of `sizing.peer`.
    #[arg(long)]
    peer: Option<String>,
    /// Ask the running box's SFU to measure again and print the limits it put in force.
    #[arg(long, conflicts_with = "peer")]
    apply: bool,
    /// Print JSON for machines instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SizingAction {
    /// Serve a measurement sink (plain HTTP) that another box measures its uplink against.
    Sink {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9446")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file: exit 0 if valid, else exit 2 with one line per problem.
    Check { file: PathBuf },
    /// Validate FILE and install it as DATA_DIR/talkbox.toml (atomically, keeping the previous
    /// version); a running supervisor then applies it. An invalid file changes nothing.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        paths: Paths,
    },
    /// Print the reference of every key (the generated part of docs/config.md).
    Reference,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("talkbox: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config or prints its problems; `Err(code)` is the exit code to use.
fn load(paths: &Paths) -> Result<Config, u8> {
    paths.options().load_config().map_err(|e| {
        eprintln!("{e}");
        EXIT_BAD_CONFIG
    })
}

fn dispatch(command: Command) -> Result<u8> {
    match command {
        Command::Run(paths) => {
            let config = match load(&paths) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            logging::init("supervisor", &config.supervisor.log_level);
            let code = supervisor::run(paths.options(), config)?;
            Ok(code as u8)
        }
        Command::Signaling(p) => run_service(Service::Signaling, &p),
        Command::Sfu(p) => run_service(Service::Sfu, &p),
        Command::Turn(p) => run_service(Service::Turn, &p),
        Command::Web(p) => run_service(Service::Web, &p),
        Command::Provision(p) => run_service(Service::Provision, &p),
        Command::EnrolToken { paths, valid_for } => enrol_token(&paths, &valid_for),
        Command::Status { paths, json } => status(&paths, json),
        Command::Config(ConfigCommand::Check { file }) => match Config::from_file(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                Ok(0)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(EXIT_BAD_CONFIG)
            }
        },
        Command::Config(ConfigCommand::Apply { file, paths }) => apply(&file, &paths),
        Command::Sizing(args) => sizing(args),
        Command::Config(ConfigCommand::Reference) => {
            print!("{}", reference_markdown());
            Ok(0)
        }
        Command::Version => {
            println!("talkbox {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
    }
}

fn run_service(service: Service, paths: &Paths) -> Result<u8> {
    let config = match load(paths) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    logging::init(service.name(), &config.supervisor.log_level);
    let data = DataDir::new(&paths.data_dir);
    let result = match service {
        Service::Web => appliance::web::main(config, data),
        Service::Signaling => appliance::signaling::main(config, data),
        Service::Sfu => appliance::sfu::main(config, data),
        Service::Turn => appliance::turn::main(config, data),
        Service::Provision => appliance::provision::service::main(config, data),
    };
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result.map(|()| 0)
}

fn apply(file: &std::path::Path, paths: &Paths) -> Result<u8> {
    let text = match appliance::config::read_config_text(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return Ok(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = Config::from_toml(&file.display().to_string(), &text) {
        eprintln!("{e}");
        eprintln!("nothing changed: the config in force stays as it is");
        return Ok(EXIT_BAD_CONFIG);
    }
    let data = DataDir::new(&paths.data_dir);
    if !data.root.exists() {
        storage::ensure_private_dir(&data.root, 0o700)
            .with_context(|| format!("creating {}", data.root.display()))?;
    }
    let target = data.config_file();
    storage::write_atomic(&target, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", target.display()))?;
    println!(
        "installed {} (previous version kept as {})",
        target.display(),
        storage::previous_version(&target).display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(control::request_reload(&data.control_socket())) {
        Ok(_) => println!("the running supervisor applied it"),
        Err(_) => println!(
            "no supervisor is running on {}; it applies at the next start",
            data.root.display()
        ),
    }
    Ok(0)
}

fn sizing(args: SizingArgs) -> Result<u8> {
    use appliance::sizing;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(SizingAction::Sink { listen }) = args.action {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("binding the sizing sink to {listen}"))?;
        println!("sizing sink listening on {listen}");
        rt.block_on(sizing::probe::serve_sink(listener))?;
        return Ok(0);
    }
    let cap = if args.apply {
        sizing::request_and_wait(&DataDir::new(&args.paths.data_dir), Duration::from_secs(40))?
    } else {
        let mut config = match load(&args.paths) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        };
        if let Some(peer) = args.peer {
            config.sizing.peer = Some(peer);
        }
        let (measured, error) = rt.block_on(sizing::measure_peer(&config));
        let browser = sizing::read_browser(&DataDir::new(&args.paths.data_dir));
        sizing::compute(sizing::links_now(), &config, measured, error, browser)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&cap)?);
    } else {
        print!("{}", sizing::describe(&cap));
    }
    Ok(0)
}

fn enrol_token(paths: &Paths, valid_for: &str) -> Result<u8> {
    let secs = provisioning::time::parse_duration(valid_for)
        .map_err(|m| anyhow::anyhow!("--valid-for: {m}"))?;
    let data = DataDir::new(&paths.data_dir);
    if !data.root.exists() {
        storage::ensure_private_dir(&data.root, 0o700)
            .with_context(|| format!("creating {}", data.root.display()))?;
    }
    let paths = appliance::provision::Paths::new(&data);
    storage::ensure_private_dir(&paths.dir, 0o700)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    let id = appliance::provision::identity::ensure(&paths.identity())?;
    let (token, expires) = appliance::provision::issue_enrolment_token(&data, secs)?;
    println!("enrolment token: {token}");
    println!("valid until:     {}", provisioning::time::rfc3339(expires));
    println!("box id:          {}", id.box_id);
    println!("pin:             {}", id.fingerprint);
    Ok(0)
}

fn status(paths: &Paths, json: bool) -> Result<u8> {
    let data = DataDir::new(&paths.data_dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(control::request_status(&data.control_socket()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!(
        "talkbox {}  supervisor pid {}  up {:.0} s  {}",
        s.version,
        s.pid,
        s.uptime_s,
        if s.ready { "ready" } else { "NOT READY" }
    );
    if let Some(code) = &s.setup_code {
        println!("unclaimed: setup code {code} (enter it on the setup page)");
    }
    println!(
        "{:<10} {:<11} {:>8} {:>10} {:>8}  last exit",
        "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS"
    );
    for svc in &s.services {
        println!(
            "{:<10} {:<11} {:>8} {:>10} {:>8}  {}",
            svc.name,
            svc.state.as_str(),
            svc.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            svc.uptime_s
                .map(|u| format!("{u:.0} s"))
                .unwrap_or_else(|| "-".into()),
            svc.restarts,
            svc.last_exit.as_deref().unwrap_or("-"),
        );
    }
    Ok(0)
}
