//! `talkbox`: the command line of the appliance. Parses arguments and hands over to the
//! library; errors meet the user here, as one clear message and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Print the version.
    Version,
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
