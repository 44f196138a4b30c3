//! Chat templates against the shared models: the built-in Llama 2 format
//! gives the tokens llama2.c's chat mode feeds, the model directories' own
//! Jinja templates render (Python string methods, `raise_exception`), and
//! special tokens in rendered text become their ids.

use std::path::{Path, PathBuf};

use llama2::Tokenizer;
use llama2_server::template::{ChatTemplate, TemplateMessage};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
}

fn msg(role: &str, content: &str) -> TemplateMessage {
    TemplateMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn tok512() -> Tokenizer {
    llama2::tokenizer::open(&models().join("tok512.bin"), Some(512)).unwrap()
}

/// The tokens llama2.c's chat mode feeds for a first turn: the rendered
/// turn encoded with BOS.
fn llama2c_turn(tok: &Tokenizer, system: Option<&str>, user: &str) -> Vec<u32> {
    let text = match system {
        Some(s) => format!("[INST] <<SYS>>\n{s}\n<</SYS>>\n\n{user} [/INST]"),
        None => format!("[INST] {user} [/INST]"),
    };
    tok.encode_text(&text, true, false).unwrap()
}

#[test]
fn bin_models_get_llama2c_chat_format() {
    let t = ChatTemplate::find(&models().join("stories260K.bin"), None).unwrap();
    assert!(t.source.contains("Llama 2"), "{}", t.source);
    let tok = tok512();
    let one = [msg("user", "Hi there")];
    let text = t.render(&one).unwrap();
    assert_eq!(text, "<s>[INST] Hi there [/INST]");
    assert_eq!(
        t.encode(&tok, &text).unwrap(),
        llama2c_turn(&tok, None, "Hi there")
    );

    let with_system = [msg("system", "Be brief."), msg("user", "Hi")];
    let text = t.render(&with_system).unwrap();
    assert_eq!(text, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
    assert_eq!(
        t.encode(&tok, &text).unwrap(),
        llama2c_turn(&tok, Some("Be brief."), "Hi")
    );
}

#[test]
fn multi_turn_conversations_close_each_answer_with_eos() {
    let t = ChatTemplate::find(&models().join("stories260K.bin"), None).unwrap();
    let turns = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")];
    let text = t.render(&turns).unwrap();
    assert_eq!(text, "<s>[INST] a [/INST] b </s><s>[INST] c [/INST]");
    let tok = tok512();
    let ids = t.encode(&tok, &text).unwrap();
    let (bos, eos) = tok.bos_eos();
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == eos).count(), 1);
}

#[test]
fn hugging_face_directory_template_matches_the_builtin_format() {
    let dir = models().join("hf/stories260K");
    let t = ChatTemplate::find(&dir, None).unwrap();
    assert!(t.source.ends_with("chat_template.jinja"), "{}", t.source);
    let builtin = ChatTemplate::find(&models().join("stories260K.bin"), None).unwrap();
    let tok = tok512();
    // The directory's template strips the turn (Python's str.strip).
    let conversation = [msg("system", "Be brief."), msg("user", "Hi  ")];
    let stripped = [msg("system", "Be brief."), msg("user", "Hi")];
    let theirs = t.encode(&tok, &t.render(&conversation).unwrap()).unwrap();
    let ours = builtin
        .encode(&tok, &builtin.render(&stripped).unwrap())
        .unwrap();
    assert_eq!(theirs, ours);
}

#[test]
fn template_exceptions_are_errors_with_their_message() {
    let t = ChatTemplate::find(&models().join("hf/stories260K"), None).unwrap();
    let err = t
        .render(&[msg("assistant", "x"), msg("user", "y")])
        .unwrap_err();
    assert!(err.contains("must alternate"), "{err}");
}

#[test]
fn llama3_template_renders_special_tokens_as_ids() {
    let dir = models().join("hf/llama3-tiny-random");
    let t = ChatTemplate::find(&dir, None).unwrap();
    let config = llama2::checkpoint::open(&dir, None).unwrap().config;
    let tok = llama2::tokenizer::find(None, &dir, &config).unwrap();
    let text = t.render(&[msg("user", "Hello")]).unwrap();
    assert!(
        text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "{text:?}"
    );
    let ids = t.encode(&tok, &text).unwrap();
    // <|begin_of_text|> 128000, <|start_header_id|> 128006, <|eot_id|> 128009.
    assert_eq!(ids[0], 128000, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 128000).count(), 1, "{ids:?}");
    assert!(ids.contains(&128006) && ids.contains(&128009), "{ids:?}");
}
