//! The `llama2` command. Parsing lives here (clap); each subcommand's work
//! lives in its own file. Errors are printed as one line on stderr with a
//! non-zero exit; usage errors exit with 2; a closed stdout ends quietly.

mod args;
mod bench;
mod check;
mod data;
mod device;
mod export;
mod perplexity;
mod run;
mod serve;
mod train;

use std::io::ErrorKind;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_with_usage(e));
    let result = match cli.command {
        Some(Command::Tokenize(a)) => run::tokenize(&a),
        Some(Command::Bench(a)) => bench::bench(&a),
        Some(Command::Synth(a)) => bench::synth(&a),
        Some(Command::Perplexity(a)) => perplexity::perplexity(&a),
        Some(Command::Check(a)) => check::check(&a),
        Some(Command::Export(a)) => export::export(&a),
        Some(Command::ExportTokenizer(a)) => export::export_tokenizer(&a),
        Some(Command::Serve(a)) => serve::serve(&a),
        Some(Command::TrainTokenizer(a)) => data::train_tokenizer(&a),
        Some(Command::Pretokenize(a)) => data::pretokenize(&a),
        Some(Command::Train(a)) => train::train(&a),
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

/// Prints a command-line error and exits with 2, like clap, but always
/// with the usage line (clap leaves it out of bad-value errors).
fn exit_with_usage(e: clap::Error) -> ! {
    let text = e.render().to_string();
    if !e.use_stderr() || text.contains("Usage:") {
        e.exit()
    }
    let mut cmd = Cli::command();
    cmd.build();
    // The usage of the subcommand being parsed, if any.
    let sub = std::env::args().nth(1).unwrap_or_default();
    let usage = match cmd.find_subcommand_mut(&sub) {
        Some(sub) => sub.render_usage().to_string(),
        None => cmd.render_usage().to_string(),
    };
    let hint = "For more information, try '--help'.";
    let text = match text.find(hint) {
        Some(at) => format!("{}{usage}\n\n{}", &text[..at], &text[at..]),
        None => format!("{text}\n{usage}\n"),
    };
    eprint!("{text}");
    std::process::exit(e.exit_code())
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
