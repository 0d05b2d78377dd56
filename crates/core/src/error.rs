//! The one error type of configuration and record validation, shared by
//! every module that checks input; it sits below all of them.

use std::fmt;

/// A configuration problem, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// Prefixes the field path: `tenant` under `credentials[3]` → `credentials[3].tenant`.
    pub fn under(mut self, parent: &str) -> ConfigError {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}
