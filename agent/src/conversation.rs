//! Conversation (short-term) memory for a continued conversation: compaction and recall. Before a
//! run continues a conversation, its real prompt size (the model's tokenizer and chat template)
//! is checked against the agent's `conversation.compact_at_tokens`; past it, the oldest messages
//! (up to a user turn, so calls and their results stay together) are summarized by the engine and
//! archived verbatim into the conversation's memory scope, and the summary plus the newest
//! messages form the next prompt. Recall searches that scope and the agent's own (hybrid) with
//! the user's input and puts the best memories in a system message just before it.
//! Owns: the policy type, the cut, the summary prompt, archiving and recall. Must not: know how a
//! caller stores its conversation (the server maps the cut back onto its items).

use crate::memory::{MemoryError, MemoryStore, NewMemory, Scope, SearchMode, SearchQuery};
use crate::runtime::{AgentRuntime, RunError};
use crate::spec::{AgentSpec, SpecError};
use kiln_inference::chat::{self, Conversation, Message, Role};
use kiln_inference::{EngineError, EngineHandle, FinishReason, Priority, Prompt, SamplingParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};

/// The first words of the system message that carries a summary (how a later compaction finds it).
pub const SUMMARY_PREFIX: &str = "Summary of the earlier conversation:";
const RECALL_PREFIX: &str = "Notes recalled from memory (earlier in this conversation, or the agent's own):";
/// Smallest threshold worth compacting at: below it a summary and a turn no longer fit.
const MIN_THRESHOLD: u32 = 256;

/// How an agent keeps a long conversation within its budget (the agent's `conversation` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationPolicy {
    /// Compact when the prompt (instructions, conversation, recalled notes and the new input)
    /// would pass this many tokens.
    #[schemars(range(min = 256))]
    pub compact_at_tokens: u32,
    /// Tokens of the newest messages kept word for word (default: a third of the threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_recent_tokens: Option<u32>,
    /// Longest summary, in tokens (default: a quarter of the threshold, at most 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_max_tokens: Option<u32>,
    /// Memories recalled into the prompt before each turn (0: none); needs the memory store.
    #[serde(default)]
    #[schemars(range(max = 20))]
    pub recall_top_k: u32,
}

impl ConversationPolicy {
    fn keep(&self) -> usize {
        self.keep_recent_tokens.unwrap_or(self.compact_at_tokens / 3) as usize
    }

    fn summary_max(&self) -> usize {
        self.summary_max_tokens.unwrap_or((self.compact_at_tokens / 4).min(512)) as usize
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let field = |f: &str| format!("conversation.{f}");
        if self.compact_at_tokens < MIN_THRESHOLD {
            return Err(SpecError::new(field("compact_at_tokens"), format!("must be at least {MIN_THRESHOLD}")));
        }
        if self.keep() + self.summary_max() >= self.compact_at_tokens as usize {
            let m = "keep_recent_tokens + summary_max_tokens must leave room under compact_at_tokens";
            return Err(SpecError::new(field("keep_recent_tokens"), m));
        }
        if self.summary_max() == 0 {
            return Err(SpecError::new(field("summary_max_tokens"), "must be at least 1"));
        }
        if self.recall_top_k > 20 {
            return Err(SpecError::new(field("recall_top_k"), "must be at most 20"));
        }
        Ok(())
    }
}

/// A conversation ready for its next run.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// What the caller keeps as the conversation from now on (summary, then the kept messages).
    pub history: Vec<Message>,
    /// What this run sees: `history` plus the recalled notes, if any.
    pub prompt_history: Vec<Message>,
    /// Leading user turns of the old history folded into the summary (0: not compacted). A
    /// caller holding the conversation in its own form cuts before the next user turn.
    pub compacted_turns: usize,
    /// The summary ended at `summary_max_tokens` rather than by itself.
    pub summary_truncated: bool,
}

impl AgentRuntime {
    /// Compacts and recalls for a run of `spec` that continues `history` with `input`, in
    /// conversation `conversation` (its memory scope is `run:{conversation}`).
    pub async fn prepare_conversation(
        &self,
        spec: &AgentSpec,
        conversation: &str,
        history: Vec<Message>,
        input: &str,
    ) -> Result<Prepared, RunError> {
        let Some(policy) = &spec.conversation else {
            return Ok(Prepared { prompt_history: history.clone(), history, ..Prepared::default() });
        };
        let (engine, memory) = (self.engine().clone(), self.memory().cloned());
        let scope = Scope::Run(conversation.to_string());
        let notes = match (&memory, policy.recall_top_k) {
            (Some(m), k) if k > 0 => recall(m, &[scope.clone(), Scope::Agent(spec.name.clone())], input, k).await?,
            _ => Vec::new(),
        };
        let mut p = Prepared { history, ..Prepared::default() };
        let instructions = spec.instructions.clone();
        let budget = policy.compact_at_tokens as usize;
        if count(&engine, &instructions, &with_notes(&p.history, &notes), input).await? > budget {
            let cut = cut_point(&engine, &p.history, policy.keep()).await?;
            let old: Vec<Message> = p.history.drain(..cut).collect();
            let (summary, truncated) = summarize(&engine, &old, policy.summary_max()).await?;
            if let Some(m) = &memory {
                archive(m, &scope, &old).await?;
            }
            p.compacted_turns = old.iter().filter(|m| m.role == Role::User).count();
            p.summary_truncated = truncated;
            p.history.insert(0, Message::new(Role::System, format!("{SUMMARY_PREFIX}\n{summary}")));
        }
        p.prompt_history = with_notes(&p.history, &notes);
        Ok(p)
    }
}

fn with_notes(history: &[Message], notes: &[String]) -> Vec<Message> {
    let mut out = history.to_vec();
    if !notes.is_empty() {
        let list: Vec<String> = notes.iter().map(|n| format!("- {n}")).collect();
        out.push(Message::new(Role::System, format!("{RECALL_PREFIX}\n{}", list.join("\n"))));
    }
    out
}

/// Prompt tokens of the instructions, `history` and `input` as the chat template renders them.
async fn count(engine: &EngineHandle, instructions: &str, history: &[Message], input: &str) -> Result<usize, RunError> {
    let mut messages = Vec::with_capacity(history.len() + 2);
    if !instructions.trim().is_empty() {
        messages.push(Message::new(Role::System, instructions));
    }
    messages.extend(history.iter().cloned());
    messages.push(Message::new(Role::User, input));
    let tok = engine.tokenizer().clone();
    let work = move || {
        let kwargs = Map::new();
        chat::render(&tok, &Conversation { messages: &messages, tools: None, kwargs: &kwargs }, true).map(|t| t.len())
    };
    Ok(tokio::task::spawn_blocking(work).await.map_err(|e| EngineError::Template(format!("count task: {e}")))??)
}

/// Where the kept tail starts: the earliest user turn after which at most `keep` tokens of
/// messages remain; after the last user turn if none does (then only the latest turn's messages
/// stay); never before the first message that is not an earlier summary.
async fn cut_point(engine: &EngineHandle, history: &[Message], keep: usize) -> Result<usize, RunError> {
    let tok = engine.tokenizer().clone();
    let texts: Vec<String> = history.iter().map(|m| m.content.clone()).collect();
    let sizes = tokio::task::spawn_blocking(move || {
        // Content plus the template's few framing tokens per message.
        texts.iter().map(|t| tok.encode(t, false).map(|ids| ids.len() + 6)).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| EngineError::Template(format!("count task: {e}")))??;
    let users: Vec<usize> = (0..history.len()).filter(|&i| history[i].role == Role::User).collect();
    let mut cut = users.last().copied().unwrap_or(history.len());
    for &u in users.iter().rev() {
        if sizes[u..].iter().sum::<usize>() > keep {
            break;
        }
        cut = u;
    }
    // Cutting at 0 would fold nothing; then everything before the last turn goes.
    Ok(if cut == 0 { users.get(1).copied().unwrap_or(history.len()) } else { cut })
}

/// The engine's summary of `old` (which may start with an earlier summary), greedy, at most
/// `max_tokens`; whether it was cut at that length.
async fn summarize(engine: &EngineHandle, old: &[Message], max_tokens: usize) -> Result<(String, bool), RunError> {
    let transcript: Vec<String> = old
        .iter()
        .filter(|m| !m.content.trim().is_empty())
        .map(|m| match m.role {
            Role::System => m.content.clone(),
            r => format!("{}: {}", r.as_str(), m.content),
        })
        .collect();
    let task = "Summarize the conversation below for the assistant who will continue it. Keep every \
                fact the user stated (names, numbers, codes, dates, preferences), every decision and \
                every open question; drop greetings and small talk. Write plain sentences.";
    let messages = [Message::new(Role::System, task), Message::new(Role::User, transcript.join("\n"))];
    let tok = engine.tokenizer().clone();
    let prompt = tokio::task::spawn_blocking(move || {
        let kwargs = Map::new();
        chat::render(&tok, &Conversation { messages: &messages, tools: None, kwargs: &kwargs }, true)
    })
    .await
    .map_err(|e| EngineError::Template(format!("render task: {e}")))??;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(max_tokens),
        priority: Priority::Background,
        ..SamplingParams::default()
    };
    let mut stream = engine.generate_async(Prompt::Tokens(prompt), params).await?;
    let (mut text, mut truncated) = (String::new(), false);
    while let Some(delta) = stream.next().await {
        let delta = delta?;
        text.push_str(&delta.text);
        if let Some(r) = delta.finish_reason {
            truncated = r == FinishReason::Length;
        }
    }
    Ok((text.trim().to_string(), truncated))
}

/// Keeps the folded messages word for word in the conversation's scope, for recall.
async fn archive(memory: &MemoryStore, scope: &Scope, old: &[Message]) -> Result<(), RunError> {
    let items: Vec<NewMemory> = old
        .iter()
        .filter(|m| matches!(m.role, Role::User | Role::Assistant) && !m.content.trim().is_empty())
        .map(|m| {
            let Some(metadata) = json!({"kind": "conversation", "role": m.role.as_str()}).as_object().cloned() else {
                unreachable!("an object literal")
            };
            NewMemory { text: format!("{}: {}", m.role.as_str(), m.content), metadata, ..Default::default() }
        })
        .collect();
    memory.add(scope, items).await.map_err(memory_error)?;
    Ok(())
}

/// The best `top_k` memories for `input` across `scopes` (hybrid search; scopes without memories
/// contribute nothing).
async fn recall(memory: &MemoryStore, scopes: &[Scope], input: &str, top_k: u32) -> Result<Vec<String>, RunError> {
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for scope in scopes {
        let q = SearchQuery {
            query: input.to_string(),
            top_k: top_k as usize,
            score_threshold: None,
            filter: Map::new(),
            mode: SearchMode::Hybrid,
        };
        match memory.search(scope, q).await {
            Ok(hits) => found.extend(hits.into_iter().map(|h| (h.score, h.memory.text))),
            Err(MemoryError::NotFound(_)) => {}
            Err(e) => return Err(memory_error(e)),
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(found.into_iter().take(top_k as usize).map(|(_, t)| t).collect())
}

fn memory_error(e: MemoryError) -> RunError {
    match e {
        MemoryError::Invalid { field, message } => RunError::Invalid(field.to_string(), message),
        MemoryError::Unavailable(m) => RunError::Unavailable(format!("conversation memory: {m}")),
        other => RunError::Engine(EngineError::Internal(format!("conversation memory: {other}"))),
    }
}
