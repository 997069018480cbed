//! The `evmm-vhost-user-blk` command; see [`evmm_vhost_user_blk::cli::Args`].

use clap::Parser;
use evmm_vhost_user_blk::cli::Args;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Args::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = args.log_level {
        logger.filter_level(level);
    }
    logger.init();
    match evmm_vhost_user_blk::run(&args.config()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evmm-vhost-user-blk: {e}");
            ExitCode::FAILURE
        }
    }
}
