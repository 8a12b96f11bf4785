//! Events: what happened to a node or an instance, and what operators did, in the
//! order it happened. The hub keeps them for a retention and serves them at
//! `/v1/events` (`verge get events`).

use serde::{Deserialize, Serialize};

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EventType {
    /// Things going as they should.
    #[default]
    Normal,
    /// Something an operator may want to look at.
    Warning,
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ObjectRef {
    /// Its kind's plural (`nodes`, `instances`...).
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Its id (sorts by time).
    #[serde(default)]
    pub name: String,
    /// When it happened (RFC 3339).
    pub time: String,
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// A short CamelCase word: `NodeReady`, `Started`, `Restarted`, `OOMKilled`...
    pub reason: String,
    /// What it is about.
    pub regarding: ObjectRef,
    /// The node involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Who did it, for operator actions (`admin`, `node/NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// What happened, for people.
    pub message: String,
}

impl Event {
    /// An event about `kind/name` now.
    pub fn new(
        event_type: EventType,
        reason: &str,
        kind: &str,
        name: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            name: String::new(),
            time: crate::clock::now_rfc3339(),
            event_type,
            reason: reason.into(),
            regarding: ObjectRef {
                kind: kind.into(),
                name: name.into(),
            },
            node: None,
            actor: None,
            message: message.into(),
        }
    }

    /// The same, on `node`.
    pub fn on(mut self, node: Option<&str>) -> Self {
        self.node = node.map(str::to_string);
        self
    }
}
