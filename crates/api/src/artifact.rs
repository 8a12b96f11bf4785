//! What a manifest's artifact field (`spec.function.component`, `spec.vm.kernel`,
//! `initrd`, `disk`) names: one rule shared by validation and the agent that fetches.

/// Where an artifact field points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'a> {
    /// An absolute path on the node, used in place.
    NodePath(&'a str),
    /// A blob in the hub's artifact store, by digest (`sha256:...`).
    Hub(&'a str),
    /// A single-file artifact in an OCI registry, e.g. `registry.example:5000/fns/hello:1`.
    Oci(&'a str),
}

impl<'a> Source<'a> {
    /// Classify a value (whether it is well-formed is [`check`]'s business).
    pub fn of(value: &'a str) -> Self {
        if value.starts_with('/') {
            Self::NodePath(value)
        } else if value.starts_with("sha256:") {
            Self::Hub(value)
        } else {
            Self::Oci(value)
        }
    }
}

/// The hex part of a `sha256:<64 lower-case hex digits>` digest, if it is one.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// What is wrong with an artifact value, if anything.
pub fn check(value: &str) -> Result<(), &'static str> {
    const FORMS: &str = "must be an OCI reference (registry.example:5000/fns/hello:1), a digest in the hub's artifact store (sha256:<64 hex digits>, from `verge artifact push FILE`), or an absolute path on the node";
    if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err(FORMS);
    }
    let ok = match Source::of(value) {
        Source::NodePath(_) => true,
        Source::Hub(d) => digest_hex(d).is_some(),
        Source::Oci(r) => !r.starts_with('.') && !r.contains(".."),
    };
    if ok { Ok(()) } else { Err(FORMS) }
}
