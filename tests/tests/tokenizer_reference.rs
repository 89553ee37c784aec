//! The tokenizer and chat template against independent references (`tests/reference/`):
//! llama.cpp's token ids and rendered chat prompts for the GGUF models (tokenizers built from GGUF
//! metadata alone), sentence-transformers' ids for MiniLM's tokenizer.json.

use anyhow::{bail, ensure, Context, Result};
use kiln_inference::tokenizer::{ChatInput, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

/// `$KILN_MODELS_DIR`, else `~/.cache/kiln/models` (filled by `scripts/fetch-models.sh`).
fn models_dir() -> PathBuf {
    std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"))
}

/// A model the default tier needs: missing is a failure telling how to fetch it.
fn required(name: &str) -> Result<PathBuf> {
    let p = models_dir().join(name);
    ensure!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    Ok(p)
}

fn reference(name: &str) -> Result<Value> {
    let dir = std::env::var_os("KILN_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference"));
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("ids: not an array")?
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).context("ids: not a u32"))
        .collect()
}

fn entries<'a>(r: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    let list = r[key].as_array().with_context(|| format!("reference has no {key}[]"))?;
    ensure!(!list.is_empty(), "reference {key}[] is empty");
    Ok(list)
}

fn load_gguf(path: &std::path::Path) -> Result<Tokenizer> {
    Ok(Tokenizer::from_gguf_file(path)?)
}

/// Checks every `tokenize[]`, `chat[]` and `completion[]` entry of one llama.cpp reference;
/// returns how many comparisons were made, or every mismatch at once.
fn check_llama_cpp_reference(tok: &Tokenizer, reference_name: &str) -> Result<usize> {
    let r = reference(reference_name)?;
    let mut fails = Vec::new();
    let mut checked = 0;
    for e in entries(&r, "tokenize")? {
        let text = e["text"].as_str().context("tokenize.text")?;
        let (want, got) = (ids(&e["ids"])?, tok.encode(text, false)?);
        if got != want {
            fails.push(format!("tokenize {text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        let back = tok.decode(&got, false)?;
        if back != text {
            fails.push(format!("decode of {text:?} gave {back:?}"));
        }
        checked += 1;
    }
    for e in entries(&r, "chat")? {
        let messages = e["messages"].as_array().context("chat.messages")?;
        let want_text = e["rendered"].as_str().context("chat.rendered")?;
        let template = tok.chat_template.as_ref().context("the GGUF has no chat template")?;
        let rendered = template.render(messages, None, true)?;
        if rendered != want_text {
            fails.push(format!("chat render:\n  got  {rendered:?}\n  want {want_text:?}"));
        }
        let (want, got) = (ids(&e["prompt_ids"])?, tok.encode(want_text, true)?);
        if got != want {
            fails.push(format!("chat prompt ids of {want_text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        if tok.decode(&got, false)? != want_text {
            fails.push(format!("chat prompt does not decode back: {want_text:?}"));
        }
        // What chat requests use: the same ids (special tokens only from the template).
        let kwargs = serde_json::Map::new();
        let chat = |messages: &[Value]| {
            tok.encode_chat(&ChatInput { messages, tools: None, add_generation_prompt: true, kwargs: &kwargs })
        };
        let via_chat = chat(messages)?;
        if via_chat != want {
            fails.push(format!("encode_chat of {want_text:?}:\n  got  {via_chat:?}\n  want {want:?}"));
        }
        // A tail that could begin a special token takes the escaped, segmented path: it must
        // give the ids of tokenizing the rendered text whole (nothing special is formed).
        let mut tailed = messages.clone();
        if let Some(Value::String(c)) = tailed.last_mut().and_then(|m| m.get_mut("content")) {
            c.push_str(" <|im");
        }
        let whole = tok.encode(&template.render(&tailed, None, true)?, true)?;
        if chat(&tailed)? != whole {
            fails.push(format!("escaped path differs for {want_text:?} + ' <|im'"));
        }
        checked += 1;
    }
    for e in entries(&r, "completion")? {
        let prompt = e["prompt"].as_str().context("completion.prompt")?;
        let (want, got) = (ids(&e["prompt_ids"])?, tok.encode(prompt, false)?);
        if got != want {
            fails.push(format!("completion prompt {prompt:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        checked += 1;
    }
    if !fails.is_empty() {
        bail!("{} mismatches over {checked} {reference_name} entries:\n{}", fails.len(), fails.join("\n"));
    }
    Ok(checked)
}

#[test]
fn smollm2_gguf_tokenizer_matches_llama_cpp() -> Result<()> {
    let tok = load_gguf(&required("smollm2-135m-instruct-q4_1.gguf")?)?;
    assert_eq!(tok.vocab_size(), 49152);
    // SmolLM2's trap: no BOS, and `<|im_end|>` (eos) plus `<|endoftext|>` end generation.
    assert!(!tok.add_bos, "SmolLM2's GGUF says add_bos_token = false");
    assert_eq!(tok.eos_ids, vec![2, 0]);
    let n = check_llama_cpp_reference(&tok, "smollm2-135m-instruct-q4_1.json")?;
    eprintln!("smollm2: {n} reference entries matched");
    Ok(())
}

#[test]
fn qwen25_gguf_tokenizer_matches_llama_cpp() -> Result<()> {
    let path = models_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if !path.is_file() {
        eprintln!("SKIP: {} not fetched (optional tier: scripts/fetch-models.sh qwen)", path.display());
        return Ok(());
    }
    let tok = load_gguf(&path)?;
    assert_eq!(tok.vocab_size(), 151936);
    assert!(!tok.add_bos);
    assert_eq!(tok.eos_ids, vec![151645, 151643]);
    // `<tool_call>` is user-defined: one token even with special parsing off, like llama.cpp.
    assert_eq!(tok.encode("<tool_call>", false)?, vec![151657]);
    assert_ne!(tok.encode("<|im_start|>", false)?, vec![151644]);
    let n = check_llama_cpp_reference(&tok, "qwen2.5-coder-0.5b-instruct-q4_k_m.json")?;
    eprintln!("qwen2.5: {n} reference entries matched");
    check_qwen_tools_render(&tok)?;
    Ok(())
}

/// Qwen2.5's template with tools and a tool-call round trip, rendered by Python Jinja2 the way HF
/// transformers sets it up (trim/lstrip blocks, `tojson` = `json.dumps(ensure_ascii=False)`).
/// Object keys are in sorted order so the expectation holds with or without `preserve_order`.
const QWEN_TOOLS_REFERENCE: &str = r##"[
 {
  "messages": [
   {
    "content": "What's the weather in Paris? Use <tools> & \"quotes\"",
    "role": "user"
   }
  ],
  "tools": [
   {
    "function": {
     "description": "Get weather <now> & 'later' — café",
     "name": "get_weather",
     "parameters": {
      "properties": {
       "city": {
        "description": "City",
        "type": "string"
       },
       "days": {
        "type": "integer"
       }
      },
      "required": [
       "city"
      ],
      "type": "object"
     }
    },
    "type": "function"
   }
  ],
  "rendered": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"function\": {\"description\": \"Get weather <now> & 'later' — café\", \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"description\": \"City\", \"type\": \"string\"}, \"days\": {\"type\": \"integer\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \"type\": \"function\"}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat's the weather in Paris? Use <tools> & \"quotes\"<|im_end|>\n<|im_start|>assistant\n"
 },
 {
  "messages": [
   {
    "content": "Weather in Paris?",
    "role": "user"
   },
   {
    "content": "",
    "role": "assistant",
    "tool_calls": [
     {
      "function": {
       "arguments": {
        "city": "Paris",
        "days": 2
       },
       "name": "get_weather"
      },
      "id": "call_1",
      "type": "function"
     }
    ]
   },
   {
    "content": "{\"temp\": 21}",
    "role": "tool",
    "tool_call_id": "call_1"
   },
   {
    "content": "{\"rain\": false}",
    "role": "tool",
    "tool_call_id": "call_1"
   }
  ],
  "tools": [
   {
    "function": {
     "description": "Get weather",
     "name": "get_weather",
     "parameters": {
      "properties": {
       "city": {
        "type": "string"
       }
      },
      "required": [
       "city"
      ],
      "type": "object"
     }
    },
    "type": "function"
   }
  ],
  "rendered": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"function\": {\"description\": \"Get weather\", \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \"type\": \"function\"}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"rain\": false}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
 }
]"##;

/// Tools go through the template's `tojson`: Python `json.dumps` spacing, no HTML escaping,
/// non-ASCII verbatim; tool calls and consecutive tool responses as Qwen formats them.
fn check_qwen_tools_render(tok: &Tokenizer) -> Result<()> {
    let template = tok.chat_template.as_ref().context("no template")?;
    let cases: Vec<Value> = serde_json::from_str(QWEN_TOOLS_REFERENCE)?;
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().context("messages")?;
        let tools = case["tools"].as_array().map(Vec::as_slice);
        let got = template.render(messages, tools, true)?;
        let want = case["rendered"].as_str().context("rendered")?;
        ensure!(got == want, "tools case {i}:\n--- got\n{got}\n--- want (Jinja2)\n{want}");
    }
    Ok(())
}

#[test]
fn minilm_tokenizer_json_matches_sentence_transformers() -> Result<()> {
    let dir = required("all-minilm-l6-v2")?;
    let tok = Tokenizer::from_dir(&dir)?;
    let r = reference("all-minilm-l6-v2.json")?;
    let max = r["max_seq_length"].as_u64().context("max_seq_length")? as usize;
    let mut fails = Vec::new();
    let items = entries(&r, "items")?;
    for item in items {
        let text = item["text"].as_str().context("items.text")?;
        let want = ids(&item["ids"])?;
        // The file's padding (to 128) is off: an unpadded encode is exactly [CLS] text [SEP].
        let got = tok.encode_with_special_tokens(text, Some(max))?;
        if got != want {
            fails.push(format!("{text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        // The file's truncation (128) is off too: without a limit the long item keeps going.
        let full = tok.encode_with_special_tokens(text, None)?;
        ensure!(
            full.len() >= want.len() && full.first() == Some(&101) && full.last() == Some(&102),
            "{text:?}: {full:?}"
        );
    }
    ensure!(fails.is_empty(), "{} of {} MiniLM items differ:\n{}", fails.len(), items.len(), fails.join("\n"));
    ensure!(items.iter().any(|i| i["ids"].as_array().map_or(0, Vec::len) == max), "no item exercises truncation");
    eprintln!("minilm: {} reference items matched", items.len());
    Ok(())
}
