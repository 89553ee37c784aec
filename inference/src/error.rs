//! The engine's typed errors. `server` alone maps them to HTTP status codes.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// A request field is out of range; `param` names the field (OpenAI-style).
    #[error("{message}")]
    InvalidParam { param: &'static str, message: String },
    /// A request field is invalid where the field's path is only known at run time
    /// (`messages[2].tool_calls[0].function.arguments`).
    #[error("{message}")]
    InvalidField { param: String, message: String },
    /// Prompt plus requested tokens do not fit the model's context.
    #[error("this model's maximum context length is {max} tokens, but the request needs {requested} ({prompt} in the prompt)")]
    ContextLengthExceeded { max: usize, prompt: usize, requested: usize },
    /// Too many requests, or too many prompt tokens, are already waiting: the caller should
    /// retry later (HTTP 429).
    #[error("the engine is overloaded (too much work waiting); retry later")]
    Overloaded,
    /// The request can never be served by this server, however long it waits: its prompts
    /// alone exceed what may wait at once, or one choice needs more KV blocks than the whole
    /// cache holds. HTTP 400 naming `param`, never 429 (retrying cannot help).
    #[error("{message}")]
    NeverFits { param: &'static str, message: String },
    /// No open session has this id (closed, or never opened).
    #[error("session {0} does not exist (closed or never opened)")]
    UnknownSession(u64),
    /// The session is running a turn; its next turn or fork must wait for that one to end.
    #[error("session {0} is busy with a turn in progress")]
    SessionBusy(u64),
    /// The engine thread has stopped (shutdown or a fatal error).
    #[error("the engine has shut down")]
    Shutdown,
    /// A `response_format` schema or tool grammar the grammar engine cannot compile (HTTP 400;
    /// the server knows which request field it came from).
    #[error("{0}")]
    Grammar(String),
    /// A grammar over one of the configured limits (size, nodes, depth, compile time): HTTP 400
    /// naming the limit.
    #[error("{0}")]
    GrammarLimit(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("model load error: {0}")]
    Load(String),
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    #[error("internal engine error: {0}")]
    Internal(String),
}
