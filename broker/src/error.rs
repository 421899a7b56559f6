//! AMQP errors and where they land.
//!
//! Every failure a peer can cause becomes an [`AmqpError`]: a reply code, a reply text a person
//! can act on, and the method that caused it. Whether it closes the channel (soft error) or the
//! whole connection (hard error) follows from the reply code alone, in [`AmqpError::is_hard`],
//! so no handler has to decide the scope itself.

use std::fmt;

/// Reply codes of AMQP 0-9-1 (and RabbitMQ's use of them).
pub mod code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// An error to report to the peer with `channel.close` or `connection.close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

pub type Result<T, E = AmqpError> = std::result::Result<T, E>;

impl AmqpError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attach the class and method ids of the method that failed (reported in the close).
    pub fn on_method(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// Hard errors close the connection; soft errors only the channel.
    pub fn is_hard(&self) -> bool {
        !matches!(
            self.code,
            code::CONTENT_TOO_LARGE
                | code::NO_ROUTE
                | code::NO_CONSUMERS
                | code::ACCESS_REFUSED
                | code::NOT_FOUND
                | code::RESOURCE_LOCKED
                | code::PRECONDITION_FAILED
        )
    }

    /// The reply text as sent: `NAME - text`, as RabbitMQ formats it, at most 255 bytes.
    pub fn reply_text(&self) -> String {
        let mut s = format!("{} - {}", code_name(self.code), self.text);
        if s.len() > 255 {
            // RabbitMQ keeps 252 bytes and marks the cut with "...".
            let mut cut = 252;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        s
    }

    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(code::ACCESS_REFUSED, text)
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(code::NOT_FOUND, text)
    }
    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(code::PRECONDITION_FAILED, text)
    }
    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(code::RESOURCE_LOCKED, text)
    }
    pub fn frame_error(text: impl Into<String>) -> Self {
        Self::new(code::FRAME_ERROR, text)
    }
    pub fn syntax(text: impl Into<String>) -> Self {
        Self::new(code::SYNTAX_ERROR, text)
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(code::COMMAND_INVALID, text)
    }
    pub fn channel_error(text: impl Into<String>) -> Self {
        Self::new(code::CHANNEL_ERROR, text)
    }
    pub fn unexpected_frame(text: impl Into<String>) -> Self {
        Self::new(code::UNEXPECTED_FRAME, text)
    }
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(code::NOT_ALLOWED, text)
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(code::NOT_IMPLEMENTED, text)
    }
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, text)
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.reply_text())
    }
}

impl std::error::Error for AmqpError {}

/// RabbitMQ's spelling of each reply code, used as the prefix of reply texts.
pub fn code_name(c: u16) -> &'static str {
    match c {
        code::REPLY_SUCCESS => "OK",
        code::CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        code::NO_ROUTE => "NO_ROUTE",
        code::NO_CONSUMERS => "NO_CONSUMERS",
        code::CONNECTION_FORCED => "CONNECTION_FORCED",
        code::INVALID_PATH => "INVALID_PATH",
        code::ACCESS_REFUSED => "ACCESS_REFUSED",
        code::NOT_FOUND => "NOT_FOUND",
        code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        code::FRAME_ERROR => "FRAME_ERROR",
        code::SYNTAX_ERROR => "SYNTAX_ERROR",
        code::COMMAND_INVALID => "COMMAND_INVALID",
        code::CHANNEL_ERROR => "CHANNEL_ERROR",
        code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        code::RESOURCE_ERROR => "RESOURCE_ERROR",
        code::NOT_ALLOWED => "NOT_ALLOWED",
        code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        code::INTERNAL_ERROR => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_follows_code() {
        assert!(!AmqpError::not_found("x").is_hard());
        assert!(!AmqpError::precondition("x").is_hard());
        assert!(AmqpError::frame_error("x").is_hard());
        assert!(AmqpError::not_allowed("x").is_hard());
    }

    #[test]
    fn reply_text_is_bounded() {
        let e = AmqpError::not_found("é".repeat(300));
        assert!(e.reply_text().len() <= 255);
        assert!(e.reply_text().starts_with("NOT_FOUND - "));
    }
}
