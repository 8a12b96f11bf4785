//! The application layer: the hub's operations on objects and who may do them,
//! written once. Every front door (the REST handlers in [`crate::http`], the edge
//! channel in [`crate::channel`], data streams in [`crate::streams`], and whatever
//! comes later: a region tier, a console) authenticates its caller into a
//! [`Principal`], parses what it was sent, calls a function here, and answers.
//!
//! The rules:
//! - an operator ([`Principal::Admin`], the admin token or another hub replica) may do
//!   everything;
//! - a node may read the objects that belong to it (itself, the instances bound to
//!   it) and report their status, but not create, change or delete objects, and not
//!   move an object to another node: what the hub decides in a status (an instance's
//!   node and placement) stays as the hub wrote it;
//! - a report about an instance names the instance's uid, so that a late report about
//!   a deleted and re-created instance of the same name is refused.
//!
//! Errors are [`ApiError`]s: a machine-readable code, a message that names the field
//! or object and says what to do, and for refusals under load a retry hint.

pub mod enrolment;
pub mod rollouts;

use verge_api::{ApiError, ErrorCode, InstanceSpec, Kind, NodeSpec, Object, RegionSpec};

use crate::state::HubState;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An operator holding an admin token (or a hub replica acting for one).
    Admin,
    /// An edge node, by name.
    Node(String),
}

impl Principal {
    /// The key its per-principal limits are kept under.
    pub fn key(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Node(n) => format!("node/{n}"),
        }
    }
}

/// Kinds whose objects may belong to a node (for node-scoped access).
pub trait NodeScoped: Kind {
    /// The node an object belongs to, if any.
    fn owner(obj: &Object<Self>) -> Option<&str>;

    /// Whether operators of a region hub for `region` may write it there (only what
    /// is placed in the region; everything else is written at the centre).
    fn in_region(_obj: &Object<Self>, _region: &str) -> bool {
        false
    }

    /// Put back into a status a node reported what only the hub decides.
    fn keep_hub_fields(_stored: &Object<Self>, _reported: &mut Self::Status) {}

    /// What is deleted with an object, in the same transaction.
    fn deleted_with(_name: &str) -> Vec<verge_store::Op> {
        Vec::new()
    }

    /// What happens once an object is deleted.
    fn after_delete(_st: &HubState, _name: &str) {}
}

impl NodeScoped for NodeSpec {
    fn owner(obj: &Object<Self>) -> Option<&str> {
        Some(obj.name())
    }

    /// A node's enrolment goes with it: every certificate it had is revoked.
    fn deleted_with(name: &str) -> Vec<verge_store::Op> {
        vec![crate::identity::forget(name)]
    }

    /// Its live session ends now, and its edge stops its workloads.
    fn after_delete(st: &HubState, name: &str) {
        st.edges.evict(
            name,
            crate::identity::NODE_DELETED,
            &format!("node '{name}' was deleted from the hub; its edge stops its workloads"),
        );
    }
}

impl NodeScoped for RegionSpec {
    fn owner(_: &Object<Self>) -> Option<&str> {
        None
    }
}

impl NodeScoped for verge_api::ClusterSpec {
    fn owner(_: &Object<Self>) -> Option<&str> {
        None
    }
}

impl NodeScoped for verge_api::ApplicationSpec {
    fn owner(_: &Object<Self>) -> Option<&str> {
        None
    }
}

impl NodeScoped for verge_api::ClusterTemplateSpec {
    fn owner(_: &Object<Self>) -> Option<&str> {
        None
    }
}

impl NodeScoped for InstanceSpec {
    fn owner(obj: &Object<Self>) -> Option<&str> {
        obj.status.node.as_deref()
    }

    fn in_region(obj: &Object<Self>, region: &str) -> bool {
        crate::region::instance_region(obj) == Some(region)
    }

    /// `node`, `placement` and `original` belong to the hub; the edge reports the rest.
    fn keep_hub_fields(stored: &Object<Self>, reported: &mut Self::Status) {
        reported.node = stored.status.node.clone();
        reported.placement = stored.status.placement.clone();
        reported.original = stored.status.original.clone();
    }
}

fn forbidden(node: &str, what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        format!("node '{node}' may only read and write its own objects, not {what}"),
    )
}

/// Refuse `what` to anyone but an operator.
pub fn admin_only(p: &Principal, what: &str) -> Result<(), ApiError> {
    match p {
        Principal::Admin => Ok(()),
        Principal::Node(n) => Err(forbidden(n, what)),
    }
}

/// On a region hub, refuse a write of what is not the region's to write.
fn region_scope<S: NodeScoped>(st: &HubState, obj: &Object<S>) -> Result<(), ApiError> {
    let Some(link) = &st.config.region else {
        return Ok(());
    };
    if S::in_region(obj, &link.region) {
        return Ok(());
    }
    let r = &link.region;
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "this hub serves region '{r}': it takes instances placed in it (spec.placement.region: {r}); write {} '{}' at the centre ({})",
            S::KIND.to_lowercase(),
            obj.name(),
            link.upstreams.join(", ")
        ),
    ))
}

/// Whether `p` may see (and report on) `obj`.
pub fn may_access<S: NodeScoped>(p: &Principal, obj: &Object<S>) -> Result<(), ApiError> {
    match p {
        Principal::Admin => Ok(()),
        Principal::Node(n) if S::owner(obj) == Some(n.as_str()) => Ok(()),
        Principal::Node(n) => Err(forbidden(
            n,
            &format!("{} '{}'", S::KIND.to_lowercase(), obj.name()),
        )),
    }
}

/// Record an operator's write of `S` `name` as an event.
fn operator_event<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    reason: &str,
    name: &str,
    what: &str,
) {
    let mut ev = verge_api::event::Event::new(
        verge_api::event::EventType::Normal,
        reason,
        S::PLURAL,
        name,
        format!("{} {name} {what} by {}", S::KIND.to_lowercase(), p.key()),
    );
    ev.actor = Some(p.key());
    st.events.record(ev);
}

/// One object.
pub async fn get<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    name: &str,
) -> Result<Object<S>, ApiError> {
    let obj = st.objects.get::<S>(name).await?;
    may_access(p, &obj)?;
    Ok(obj)
}

/// Create a new object.
pub async fn create<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    obj: Object<S>,
) -> Result<Object<S>, ApiError> {
    admin_only(p, &format!("creating {}", S::PLURAL))?;
    region_scope(st, &obj)?;
    let obj = st.objects.create(obj).await?;
    operator_event::<S>(st, p, "Created", obj.name(), "created");
    Ok(obj)
}

/// Create or update `name` from `obj`; whether it was created.
pub async fn apply<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    name: &str,
    obj: Object<S>,
) -> Result<(Object<S>, bool), ApiError> {
    admin_only(p, &format!("changing {} '{name}'", S::KIND.to_lowercase()))?;
    if obj.name() != name {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!(
                "metadata.name: '{}' does not match the name in the URL ('{name}')",
                obj.name()
            ),
        ));
    }
    region_scope(st, &obj)?;
    let applied = st.objects.apply(obj).await?;
    let (reason, what) = if applied.1 {
        ("Created", "created".to_string())
    } else {
        (
            "Applied",
            format!("applied (generation {})", applied.0.metadata.generation),
        )
    };
    operator_event::<S>(st, p, reason, name, &what);
    Ok(applied)
}

/// Replace `name`'s status with `status`. From a node, only for an object of its own
/// (of uid `uid`, when given), and with what the hub decides kept.
pub async fn update_status<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    name: &str,
    uid: Option<&str>,
    status: S::Status,
) -> Result<Object<S>, ApiError> {
    let obj = st
        .objects
        .update_status::<S>(name, |obj, s| {
            if let (Principal::Node(node), Some(uid)) = (p, uid)
                && (obj.metadata.uid != uid || S::owner(obj) != Some(node.as_str()))
            {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "{} '{name}' (uid {uid}) is not bound to node '{node}'",
                        S::KIND.to_lowercase()
                    ),
                ));
            }
            may_access(p, obj)?;
            *s = status.clone();
            if let Principal::Node(_) = p {
                S::keep_hub_fields(obj, s);
            }
            Ok(true)
        })
        .await?;
    Ok(obj)
}

/// Delete `name` and what goes with it.
pub async fn delete<S: NodeScoped>(
    st: &HubState,
    p: &Principal,
    name: &str,
) -> Result<Object<S>, ApiError> {
    admin_only(p, &format!("deleting {} '{name}'", S::KIND.to_lowercase()))?;
    let mut also = S::deleted_with(name);
    if st.config.region.is_some() {
        // A region's delete goes up to the centre, from a tombstone.
        let current = st.objects.get::<S>(name).await?;
        region_scope(st, &current)?;
        also.push(crate::region::uplink::tombstone(
            S::PLURAL,
            name,
            &current.metadata.uid,
            current.metadata.generation,
        ));
    }
    let obj = st.objects.delete_with::<S>(name, also).await?;
    S::after_delete(st, name);
    operator_event::<S>(st, p, "Deleted", name, "deleted");
    Ok(obj)
}
