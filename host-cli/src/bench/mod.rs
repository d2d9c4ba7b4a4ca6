//! `mxc-vm bench`: latency benchmarks that compare against a baseline in the same run.

mod boot;
mod density;
mod exec;
mod fs;
mod proxy;
mod serve;
pub mod stats;

use crate::cli::BenchCommand;
use crate::failure::Failure;

pub fn run(cmd: BenchCommand) -> Result<i32, Failure> {
    match cmd {
        BenchCommand::Exec(args) => exec::run(args),
        BenchCommand::Proxy(args) => proxy::run(args),
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Fs(args) => fs::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Density(args) => density::run(args),
    }
}
