//! `llama2 train-tokenizer` and `llama2 pretokenize`: the data side of
//! llama2.c's training workflow (tinystories.py `train_vocab` and
//! `pretokenize`), with progress bars over the input bytes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llama2::corpus::{self, Documents};
use llama2::{pretokenize, tokenizer, tokenizer_train};

use crate::args::{PretokenizeArgs, TrainTokenizerArgs};

/// Documents compared between tokenizer.json and tokenizer.bin after training.
const AGREEMENT_DOCUMENTS: usize = 500;

/// `llama2 train-tokenizer`.
pub fn train_tokenizer(args: &TrainTokenizerArgs) -> Result<()> {
    let total = total_size(&args.input)?;
    let bar = bytes_bar(total, "read");
    let failure = Arc::new(Mutex::new(None));
    let feed = Feed::new(&args.input, Some(bar.clone()), failure.clone());
    let trained = tokenizer_train::train(feed, args.vocab_size);
    bar.finish_and_clear();
    if let Some(e) = failure.lock().expect("not poisoned").take() {
        return Err(e.into());
    }
    let trained = trained?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let json = args.out.join("tokenizer.json");
    let bin = args.out.join("tokenizer.bin");
    write(&json, trained.json.as_bytes())?;
    write(&bin, &trained.bin)?;
    println!(
        "wrote {} and {}: {} tokens (3 special, 256 bytes, {} merges, {} characters)",
        json.display(),
        bin.display(),
        args.vocab_size,
        trained.merges,
        trained.characters
    );
    let (same, compared) = agreement(&args.input, &json, &bin)?;
    println!(
        "tokenizer.json and tokenizer.bin give the same ids on {same} of the first \
         {compared} documents"
    );
    Ok(())
}

/// How many of the first documents of `inputs` both tokenizers encode alike.
fn agreement(inputs: &[PathBuf], json: &Path, bin: &Path) -> Result<(usize, usize)> {
    let by_json = tokenizer::open(json, None)?;
    let by_bin = tokenizer::open(bin, None)?;
    let failure = Arc::new(Mutex::new(None));
    let mut same = 0;
    let mut compared = 0;
    for doc in Feed::new(inputs, None, failure).take(AGREEMENT_DOCUMENTS) {
        compared += 1;
        if by_json.encode_text(&doc, true, false)? == by_bin.encode_text(&doc, true, false)? {
            same += 1;
        }
    }
    Ok((same, compared))
}

/// `llama2 pretokenize`.
pub fn pretokenize(args: &PretokenizeArgs) -> Result<()> {
    let tok = tokenizer::open(&args.tokenizer, None)?;
    pretokenize::check_tokenizer(&tok)
        .with_context(|| format!("cannot use {}", args.tokenizer.display()))?;
    let total = total_size(&args.input)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let bar = bytes_bar(total, "encoded");
    let (mut documents, mut tokens, mut shards) = (0u64, 0u64, 0usize);
    let mut done = 0;
    for input in &args.input {
        let progress = |read: u64| bar.set_position(done + read);
        let (written, next) = pretokenize::pretokenize_file(
            &tok,
            input,
            &args.out,
            args.shard_tokens,
            shards,
            &progress,
        )?;
        documents += written.documents;
        tokens += written.tokens;
        shards = next;
        done += corpus::file_size(input)?;
    }
    bar.finish_and_clear();
    if documents == 0 {
        bail!("the input holds no documents: every file is empty or blank");
    }
    println!(
        "wrote {shards} shards to {}: {tokens} tokens in {documents} documents, {:.1} tokens \
         per document on average",
        args.out.display(),
        tokens as f64 / documents as f64
    );
    Ok(())
}

/// The bytes of all `inputs`, failing on the first that cannot be read.
fn total_size(inputs: &[PathBuf]) -> Result<u64> {
    let mut total = 0;
    for input in inputs {
        if input.is_dir() {
            bail!("{} is a directory; give the files in it", input.display());
        }
        total += corpus::file_size(input)?;
    }
    Ok(total)
}

fn bytes_bar(total: u64, verb: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{bar:40}} {{bytes}}/{{total_bytes}} {verb}  {{bytes_per_sec}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
    bar
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The documents of several files as one iterator of strings, as the BPE
/// trainer wants them. The trainer cannot be handed an error, so the first
/// one stops the iteration and is kept in `failure` for the caller.
struct Feed {
    paths: std::collections::VecDeque<PathBuf>,
    current: Option<Documents>,
    /// Bytes of the files finished, and the bar they advance.
    done: u64,
    bar: Option<ProgressBar>,
    failure: Arc<Mutex<Option<llama2::Error>>>,
}

impl Feed {
    fn new(
        paths: &[PathBuf],
        bar: Option<ProgressBar>,
        failure: Arc<Mutex<Option<llama2::Error>>>,
    ) -> Self {
        Feed {
            paths: paths.to_vec().into(),
            current: None,
            done: 0,
            bar,
            failure,
        }
    }

    fn fail(&mut self, e: llama2::Error) -> Option<String> {
        *self.failure.lock().expect("not poisoned") = Some(e);
        self.paths.clear();
        self.current = None;
        None
    }
}

impl Iterator for Feed {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(docs) = &mut self.current {
                match docs.next() {
                    Some(Ok(doc)) => {
                        if let Some(bar) = &self.bar {
                            bar.set_position(self.done + docs.bytes_read());
                        }
                        return Some(doc);
                    }
                    Some(Err(e)) => return self.fail(e),
                    None => self.done += docs.bytes_read(),
                }
            }
            let path = self.paths.pop_front()?;
            match Documents::open(&path) {
                Ok(docs) => self.current = Some(docs),
                Err(e) => return self.fail(e),
            }
        }
    }
}
