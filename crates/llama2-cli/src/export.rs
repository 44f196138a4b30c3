//! `llama2 export` and `llama2 export-tokenizer`: the Rust replacements for
//! llama2.c's export.py and tokenizer.py. Any model the program reads is
//! written as a llama2.c version 0, 1 or 2 file, tensor by tensor, with a
//! progress bar; the output appears under its name only once complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llama2::checkpoint::{self, FileFormat};
use llama2::sentencepiece::SentencePieceModel;

use crate::args::{ExportArgs, ExportFormat, ExportTokenizerArgs};

/// export.py's group size: 64, halved until it divides `dim`.
fn export_py_group_size(dim: usize) -> usize {
    let mut gs = 64;
    while gs > 1 && !dim.is_multiple_of(gs) {
        gs /= 2;
    }
    gs
}

/// `llama2 export`.
pub fn export(args: &ExportArgs) -> Result<()> {
    if args.format == ExportFormat::Hf && args.output.exists() {
        bail!(
            "{} exists; give a new directory name",
            args.output.display()
        );
    }
    let weights = checkpoint::open(&args.input, args.ctx_size)?;
    match args.format {
        ExportFormat::Hf => return export_hf(args, &weights),
        ExportFormat::Gguf => return export_gguf(args, &weights),
        ExportFormat::Llama2c => {}
    }
    let c = &weights.config;
    let format = match args.version {
        0 => FileFormat::V0,
        1 => FileFormat::V1,
        _ => {
            let gs = args
                .group_size
                .unwrap_or_else(|| export_py_group_size(c.dim));
            if gs == 0 {
                bail!("--group-size 0: give a positive group size such as 64");
            }
            FileFormat::V2 { group_size: gs }
        }
    };
    let total = weights.bytes_per_token();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} written  {bytes_per_sec}")
            .expect("valid template"),
    );
    write_atomically(&args.output, |out| {
        let mut counted = Counted {
            inner: out,
            bar: &bar,
        };
        checkpoint::write(&weights, format, &mut counted)
            .with_context(|| format!("cannot export {}", args.input.display()))
    })?;
    bar.finish_and_clear();
    report_written(args, &weights, &format.describe());
    Ok(())
}

/// The line an export ends with: what it wrote (`what`: the output's form)
/// from what.
fn report_written(args: &ExportArgs, weights: &llama2::ModelWeights, what: &str) {
    eprintln!(
        "wrote {} ({what}) from {} ({})",
        args.output.display(),
        args.input.display(),
        weights.format.describe()
    );
}

/// `llama2 export --format hf`: a Hugging Face directory, built under a
/// temporary name and renamed when complete. The tokenizer goes along as
/// the file it came from (tokenizer.model or tokenizer.json, with a
/// tokenizer_config.json beside it), else as tokenizer.bin.
fn export_hf(args: &ExportArgs, weights: &llama2::ModelWeights) -> Result<()> {
    let dtype = args.dtype.unwrap_or(llama2::DType::F32);
    let tokenizer_file = find_tokenizer_file(args);
    let tokenizer =
        llama2::tokenizer::find(args.tokenizer.as_deref(), &args.input, &weights.config)?;
    let out = &args.output;
    let name = out.file_name().context("the output needs a name")?;
    let tmp = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        llama2::checkpoint::hf::write_dir(weights, &tmp, dtype)?;
        match &tokenizer_file {
            Some(file) => {
                let kind = file.extension().and_then(|e| e.to_str()).unwrap_or("model");
                std::fs::copy(file, tmp.join(format!("tokenizer.{kind}")))?;
                let config = file.with_file_name("tokenizer_config.json");
                if config.is_file() {
                    std::fs::copy(&config, tmp.join("tokenizer_config.json"))?;
                }
            }
            None => std::fs::write(tmp.join("tokenizer.bin"), tokenizer.to_bin_bytes())?,
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))?;
    report_written(args, weights, &format!("Hugging Face, {}", dtype.name()));
    Ok(())
}

/// `llama2 export --format gguf`: one GGUF file with the tokenizer inside.
fn export_gguf(args: &ExportArgs, weights: &llama2::ModelWeights) -> Result<()> {
    let dtype = args.dtype.unwrap_or(llama2::DType::F32);
    if dtype == llama2::DType::BF16 {
        bail!("--dtype bf16: GGUF export writes f32, f16 or q8 (Q8_0)");
    }
    let tokenizer =
        llama2::tokenizer::find(args.tokenizer.as_deref(), &args.input, &weights.config)?;
    write_atomically(&args.output, |out| {
        llama2::checkpoint::gguf_write::write(weights, &tokenizer, dtype, out)
            .with_context(|| format!("cannot export {}", args.input.display()))
    })?;
    report_written(args, weights, &format!("GGUF, {}", dtype.name()));
    Ok(())
}

/// The tokenizer.model or tokenizer.json that goes with the export's
/// input, when it has one in that form: `-z`, or the one a model directory
/// holds (the same file `tokenizer::find` reads there).
fn find_tokenizer_file(args: &ExportArgs) -> Option<std::path::PathBuf> {
    let is_copyable = |p: &Path| {
        p.is_file()
            && matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("model" | "json")
            )
    };
    if let Some(p) = &args.tokenizer {
        return is_copyable(p).then(|| p.clone());
    }
    if !args.input.is_dir() {
        return None;
    }
    ["tokenizer.model", "tokenizer.json"]
        .iter()
        .map(|n| args.input.join(n))
        .find(|p| is_copyable(p))
}

/// `llama2 export-tokenizer`.
pub fn export_tokenizer(args: &ExportTokenizerArgs) -> Result<()> {
    let ext = args
        .input
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    if ext == "json" {
        bail!(
            "{}: Hugging Face tokenizer.json is not supported yet; give the model's \
             SentencePiece tokenizer.model",
            args.input.display()
        );
    }
    let model = SentencePieceModel::load(&args.input)?;
    let bytes = model.to_tokenizer_bin();
    write_atomically(&args.output, |out| Ok(out.write_all(&bytes)?))?;
    eprintln!(
        "wrote {} ({} tokens) from {}",
        args.output.display(),
        model.pieces.len(),
        args.input.display()
    );
    Ok(())
}

/// Runs `write` on a temporary file beside `path` and renames it into place
/// when it succeeds, so a failed or interrupted export leaves no partial
/// file under the output's name.
fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let name = path.file_name().context("the output needs a file name")?;
    let tmp = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let result = write(&mut out).and_then(|()| {
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// A writer that advances a progress bar by the bytes written.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    bar: &'a ProgressBar,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
