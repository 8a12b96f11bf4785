//! Arbitrary bytes from a data stream through the chunk reader and the stream hello
//! decoder: nothing may panic, oversized chunks are refused before allocation, and a
//! chunk that reads must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_api::channel::StreamHello;
use verge_tunnel::chunk::read_chunk;
use verge_tunnel::frame::decode;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<StreamHello>(data);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(c)) = read_chunk(&mut r).await {
            let wire = c.encode();
            let again = read_chunk(&mut &wire[..]).await.expect("re-read").expect("chunk");
            assert_eq!(again, c);
        }
    });
});
