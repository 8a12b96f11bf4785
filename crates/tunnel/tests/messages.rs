//! Every channel message survives the framing: encode, split anywhere, decode, equal.

use proptest::prelude::*;
use verge_api::channel::{
    EdgeToHub, HubToEdge, InstanceChange, RequestBody, ResponseBody, SitePeer, StreamHello,
    StreamPurpose,
};
use verge_api::{
    Instance, InstancePhase, InstanceSpec, InstanceStatus, NodePhase, NodeStatus, ProcessSpec,
};
use verge_tunnel::chunk::Chunk;
use verge_tunnel::frame::{FrameDecoder, decode, encode};

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,20}"
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes, backslashes and control characters.
    any::<String>()
}

fn instance() -> impl Strategy<Value = Instance> {
    (
        name(),
        proptest::collection::vec(text(), 1..4),
        any::<u64>(),
        0u64..64_000,
        proptest::option::of(name()),
    )
        .prop_map(|(n, command, generation, cpu, node)| {
            let mut spec = InstanceSpec {
                process: Some(ProcessSpec {
                    command,
                    ..Default::default()
                }),
                ..Default::default()
            };
            spec.resources.cpu = verge_api::Cpu(cpu);
            let mut i = Instance::new(n, spec);
            i.metadata.generation = generation;
            i.status.node = node;
            i
        })
}

fn status() -> impl Strategy<Value = InstanceStatus> {
    (
        any::<u32>(),
        proptest::option::of(any::<i32>()),
        text(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(restarts, exit_code, message, pid)| InstanceStatus {
            phase: InstancePhase::Running,
            restarts,
            exit_code,
            message,
            pid,
            ..Default::default()
        })
}

fn edge_msg() -> impl Strategy<Value = EdgeToHub> {
    prop_oneof![
        (any::<u32>(), text(), name(), text()).prop_map(
            |(protocol_version, token, node_name, csr_pem)| EdgeToHub::Enroll {
                protocol_version,
                token,
                node_name,
                csr_pem,
                labels: [("region".to_string(), "eu".to_string())]
                    .into_iter()
                    .collect(),
            }
        ),
        (
            any::<u32>(),
            text(),
            any::<u64>(),
            proptest::option::of(text())
        )
            .prop_map(|(protocol_version, agent_version, since_revision, epoch)| {
                EdgeToHub::Hello {
                    protocol_version,
                    agent_version,
                    since_revision,
                    epoch,
                }
            }),
        proptest::option::of((text(), any::<u64>())).prop_map(|s| EdgeToHub::Heartbeat {
            status: s.map(|(hostname, cpu)| {
                Box::new(NodeStatus {
                    phase: NodePhase::Ready,
                    hostname,
                    capacity: verge_api::ResourceList {
                        cpu: verge_api::Cpu(cpu),
                        ..Default::default()
                    },
                    ..Default::default()
                })
            }),
        }),
        (name(), text(), status()).prop_map(|(name, uid, status)| EdgeToHub::InstanceStatus {
            name,
            uid,
            status
        }),
        (name(), text()).prop_map(|(name, uid)| EdgeToHub::InstanceRemoved { name, uid }),
        (any::<u64>(), text()).prop_map(|(id, data)| EdgeToHub::Response {
            id,
            body: ResponseBody::Logs { data }
        }),
        (any::<u64>(), text()).prop_map(|(id, message)| EdgeToHub::Response {
            id,
            body: ResponseBody::Error { message }
        }),
        (text(), text()).prop_map(|(code, message)| EdgeToHub::Error { code, message }),
        text().prop_map(|csr_pem| EdgeToHub::Renew { csr_pem }),
    ]
}

fn hub_msg() -> impl Strategy<Value = HubToEdge> {
    prop_oneof![
        (text(), text()).prop_map(|(cert_pem, ca_pem)| HubToEdge::Enrolled { cert_pem, ca_pem }),
        (
            any::<u32>(),
            name(),
            any::<u64>(),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(protocol_version, node, heartbeat_interval_ms, epoch, reconnect_spread_ms)| {
                    HubToEdge::Welcome {
                        protocol_version,
                        node,
                        heartbeat_interval_ms,
                        epoch,
                        reconnect_spread_ms,
                    }
                }
            ),
        (any::<u64>(), proptest::collection::vec(instance(), 0..4)).prop_map(
            |(revision, instances)| HubToEdge::Snapshot {
                revision,
                instances
            }
        ),
        (
            any::<u64>(),
            proptest::collection::vec(instance(), 0..4),
            any::<bool>()
        )
            .prop_map(|(revision, instances, last)| HubToEdge::SnapshotPart {
                revision,
                instances,
                last
            }),
        (
            any::<u64>(),
            proptest::collection::vec(
                prop_oneof![
                    instance().prop_map(|i| InstanceChange::Upsert {
                        instance: Box::new(i)
                    }),
                    name().prop_map(|name| InstanceChange::Remove { name }),
                ],
                0..4
            )
        )
            .prop_map(|(revision, changes)| HubToEdge::Changes { revision, changes }),
        any::<u64>().prop_map(|revision| HubToEdge::Bookmark { revision }),
        Just(HubToEdge::HeartbeatAck),
        any::<u64>().prop_map(|reconnect_spread_ms| HubToEdge::Fleet {
            reconnect_spread_ms
        }),
        (any::<u64>(), name(), any::<u64>()).prop_map(|(id, instance, tail_bytes)| {
            HubToEdge::Request {
                id,
                body: RequestBody::Logs {
                    instance,
                    tail_bytes,
                },
            }
        }),
        (text(), text(), proptest::option::of(any::<u64>())).prop_map(
            |(code, message, retry_after_ms)| HubToEdge::Error {
                code,
                message,
                retry_after_ms
            }
        ),
        any::<u64>().prop_map(|id| HubToEdge::Cancel { id }),
        text().prop_map(|cert_pem| HubToEdge::Renewed { cert_pem }),
        (
            text(),
            proptest::collection::vec(
                (name(), text()).prop_map(|(name, address)| SitePeer { name, address }),
                0..3
            )
        )
            .prop_map(|(key, peers)| HubToEdge::Peers { key, peers }),
        proptest::collection::vec((name(), name(), text(), any::<u16>()), 0..4).prop_map(|es| {
            HubToEdge::Endpoints {
                endpoints: es
                    .into_iter()
                    .map(
                        |(instance, node, host, port)| verge_api::cluster::Endpoint {
                            instance,
                            node,
                            host,
                            ports: vec![verge_api::instance::PortSpec {
                                name: "p".into(),
                                port,
                            }],
                            ..Default::default()
                        },
                    )
                    .collect(),
            }
        }),
        (any::<u64>(), purpose()).prop_map(|(id, purpose)| HubToEdge::OpenStream { id, purpose }),
        (any::<u64>(), name(), any::<u64>()).prop_map(|(id, instance, tail_bytes)| {
            HubToEdge::Request {
                id,
                body: RequestBody::LogsFollow {
                    instance,
                    tail_bytes,
                },
            }
        }),
    ]
}

fn purpose() -> impl Strategy<Value = StreamPurpose> {
    prop_oneof![
        (name(), any::<u64>(), any::<bool>()).prop_map(|(instance, tail_bytes, follow)| {
            StreamPurpose::Logs {
                instance,
                tail_bytes,
                follow,
            }
        }),
        (
            name(),
            proptest::collection::vec(text(), 1..4),
            any::<bool>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(instance, command, tty, cols, rows)| StreamPurpose::Exec {
                instance,
                command,
                tty,
                cols,
                rows,
            }),
        (name(), any::<u16>())
            .prop_map(|(instance, port)| StreamPurpose::PortForward { instance, port }),
    ]
}

fn stream_hello() -> impl Strategy<Value = StreamHello> {
    prop_oneof![
        any::<u64>().prop_map(|id| StreamHello::Accept { id }),
        (name(), name(), any::<u16>()).prop_map(|(from, to, port)| StreamHello::Relay {
            from,
            to,
            port
        }),
        "[a-z0-9:]{0,80}".prop_map(|digest| StreamHello::Artifact { digest }),
        any::<u32>().prop_map(|ack_every| StreamHello::Metrics { ack_every }),
    ]
}

/// A metrics hello from before `ackEvery` reads as "answer every round", and one
/// that asks for it reads on a hub from before it (which answers every round, and
/// the edge takes that).
#[test]
fn metrics_hellos_read_both_ways_across_versions() {
    let old: StreamHello = serde_json::from_str(r#"{"type":"metrics"}"#).unwrap();
    assert_eq!(old, StreamHello::Metrics { ack_every: 0 });
    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(tag = "type", rename_all = "camelCase")]
    enum OldHello {
        Metrics,
    }
    let new = serde_json::to_string(&StreamHello::Metrics { ack_every: 6 }).unwrap();
    assert_eq!(new, r#"{"type":"metrics","ackEvery":6}"#);
    assert_eq!(
        serde_json::from_str::<OldHello>(&new).unwrap(),
        OldHello::Metrics
    );
}

fn chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Chunk::Data),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Chunk::Stderr),
        Just(Chunk::Eof),
        (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| Chunk::Resize { cols, rows }),
        any::<i32>().prop_map(Chunk::Exit),
        text().prop_map(Chunk::Error),
        Just(Chunk::Ping),
    ]
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    msgs: &[T],
    cut: usize,
) {
    let mut wire = Vec::new();
    for m in msgs {
        wire.extend(encode(m).expect("encode"));
    }
    let cut = cut % (wire.len() + 1);
    let mut d = FrameDecoder::default();
    let mut got = Vec::new();
    for part in [&wire[..cut], &wire[cut..]] {
        d.push(part);
        while let Some(f) = d.next_frame().expect("frame") {
            got.push(decode::<T>(&f).expect("decode"));
        }
    }
    assert_eq!(&got, msgs);
}

proptest! {
    #[test]
    fn every_edge_message_round_trips(msgs in proptest::collection::vec(edge_msg(), 1..6), cut in any::<usize>()) {
        round_trip(&msgs, cut);
    }

    #[test]
    fn every_stream_hello_round_trips(msgs in proptest::collection::vec(stream_hello(), 1..6), cut in any::<usize>()) {
        round_trip(&msgs, cut);
    }

    #[test]
    fn every_chunk_round_trips(chunks in proptest::collection::vec(chunk(), 1..8)) {
        let wire: Vec<u8> = chunks.iter().flat_map(Chunk::encode).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let got = rt.block_on(async {
            let mut r = &wire[..];
            let mut got = Vec::new();
            while let Some(c) = verge_tunnel::chunk::read_chunk(&mut r).await.expect("chunk") {
                got.push(c);
            }
            got
        });
        prop_assert_eq!(got, chunks);
    }

    #[test]
    fn every_hub_message_round_trips(msgs in proptest::collection::vec(hub_msg(), 1..6), cut in any::<usize>()) {
        round_trip(&msgs, cut);
    }
}

/// Fields that are maps of data (labels, env...), not records: a key added there is
/// data, not a new field.
const MAP_FIELDS: &[&str] = &[
    "annotations",
    "asics",
    "env",
    "gpus",
    "info",
    "labels",
    "nodeSelector",
];

/// `v` with an unknown field added to every record at every level: what a newer peer
/// sends when it has grown optional fields.
fn with_future_fields(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if !MAP_FIELDS.contains(&k.as_str()) {
                    with_future_fields(x);
                }
            }
            m.insert(
                "fieldFromTheFuture".into(),
                serde_json::json!({"nested": [1, 2, 3]}),
            );
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(with_future_fields),
        _ => {}
    }
}

/// A message from a newer peer, with fields this build does not know at every level,
/// decodes to what it would be without them (the wire is lenient; only what users
/// write is strict).
fn tolerates_the_next_version<
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
>(
    msg: &T,
) {
    let mut v = serde_json::to_value(msg).expect("to value");
    with_future_fields(&mut v);
    let wire = serde_json::to_vec(&v).expect("encode");
    let got: T = decode(&wire).expect("a newer peer's message decodes");
    assert_eq!(&got, msg);
}

proptest! {
    #[test]
    fn every_hub_message_decodes_with_unknown_fields_at_every_level(msg in hub_msg()) {
        tolerates_the_next_version(&msg);
    }

    #[test]
    fn every_edge_message_decodes_with_unknown_fields_at_every_level(msg in edge_msg()) {
        tolerates_the_next_version(&msg);
    }

    #[test]
    fn every_stream_hello_decodes_with_unknown_fields_at_every_level(msg in stream_hello()) {
        tolerates_the_next_version(&msg);
    }
}
