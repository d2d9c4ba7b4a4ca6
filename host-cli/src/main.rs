//! The `mxc-vm` command.

mod backends_cmd;
mod bench;
mod cli;
mod failure;
mod image_cmd;
mod jsonl;
mod lxc_exec;
mod policy_cmd;
mod progress;
mod run_cmd;
mod serve;

use clap::Parser;

use cli::{Cli, Commands};

fn main() {
    // Re-executions of this binary as the process sandbox's init never return from here.
    sandbox::init_hook();
    sandbox::stages::mark("host: main");
    // Started as MXC's executor (a link named lxc-exec): its contract, not our CLI.
    if std::env::args_os()
        .next()
        .as_deref()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == lxc_exec::NAME)
    {
        let rest: Vec<String> = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        std::process::exit(lxc_exec::main(&rest));
    }
    let cli = Cli::parse();
    let json = match &cli.command {
        Commands::Run(a) => a.json,
        Commands::Policy(cli::PolicyCommand::Check { json, .. })
        | Commands::Policy(cli::PolicyCommand::Explain { json, .. }) => *json,
        Commands::Policy(cli::PolicyCommand::Schema) => false,
        Commands::Backends(a) => a.json,
        Commands::Bench(cli::BenchCommand::Exec(a)) => a.json,
        Commands::Image(cli::ImageCommand::Build(a) | cli::ImageCommand::Show(a)) => a.json,
        Commands::Bench(cli::BenchCommand::Proxy(a)) => a.json,
        Commands::Bench(cli::BenchCommand::Boot(a)) => a.json,
        Commands::Bench(cli::BenchCommand::Fs(a)) => a.json,
        Commands::Bench(cli::BenchCommand::Serve(a)) => a.json,
        Commands::Bench(cli::BenchCommand::Density(a)) => a.json,
        Commands::Serve(_) => false,
    };
    let is_run = matches!(cli.command, Commands::Run(_));
    let result = match cli.command {
        Commands::Run(args) => run_cmd::run(*args),
        Commands::Policy(cmd) => policy_cmd::run(cmd),
        Commands::Backends(args) => backends_cmd::run(args),
        Commands::Bench(cmd) => bench::run(cmd),
        Commands::Image(cmd) => image_cmd::run(cmd),
        Commands::Serve(args) => serve::run(args),
    };
    // A run stopped by SIGTERM, SIGINT or SIGHUP removed its sandbox on the way out
    // (whatever the command or the backend said as it went) and ends as the signal would.
    if let Some(signal) = is_run.then(sandbox::interrupt::taken).flatten() {
        std::process::exit(run_cmd::report_interrupt(signal, json));
    }
    let code = match result {
        Ok(code) => code,
        Err(failure) => failure.report(json),
    };
    std::process::exit(code);
}
