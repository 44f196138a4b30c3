//! The `llama2` command. Parsing lives here (clap); each subcommand's work
//! lives in its own file. Errors are printed as one line on stderr with a
//! non-zero exit; usage errors exit with 2; a closed stdout ends quietly.

mod args;
mod bench;
mod check;
mod device;
mod perplexity;
mod run;

use std::io::ErrorKind;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Tokenize(a)) => run::tokenize(&a),
        Some(Command::Bench(a)) => bench::bench(&a),
        Some(Command::Synth(a)) => bench::synth(&a),
        Some(Command::Perplexity(a)) => perplexity::perplexity(&a),
        Some(Command::Check(a)) => check::check(&a),
        None => run::run(&cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the error is stdout having been closed by the reader (`| head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = cause.downcast_ref::<std::io::Error>().or_else(|| {
            match cause.downcast_ref::<llama2::Error>() {
                Some(llama2::Error::Output(io)) => Some(io),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
    })
}
