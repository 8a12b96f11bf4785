//! A tiny HTTP function (the `wasi:http/proxy` world): `GET /anything` answers
//! `hello from /anything`; `/spin` never returns (the host must interrupt it);
//! `/hog` tries to hold 64 MiB (the host's memory limit must stop it).

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

wasi::http::proxy::export!(Hello);

struct Hello;

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let resp = OutgoingResponse::new(Fields::new());
    let _ = resp.set_status_code(status);
    let Ok(b) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    if let Ok(stream) = b.write() {
        let _ = stream.blocking_write_and_flush(body);
        drop(stream);
    }
    let _ = OutgoingBody::finish(b, None);
}

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        match path.as_str() {
            "/spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/hog" => {
                let v = vec![7u8; 64 << 20];
                respond(out, 200, format!("held {} bytes", std::hint::black_box(v).len()).as_bytes());
            }
            _ => {
                // Standard output is the instance's log on the node.
                println!("request for {path}");
                respond(out, 200, format!("hello from {path}").as_bytes())
            }
        }
    }
}
