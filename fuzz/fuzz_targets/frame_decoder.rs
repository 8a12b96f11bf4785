//! Arbitrary bytes from the network through the frame decoder and both message decoders:
//! nothing may panic, and a frame that decodes must re-encode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_api::channel::{EdgeToHub, HubToEdge};
use verge_tunnel::frame::{FrameDecoder, decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::default();
    // Feed in two parts to exercise partial frames.
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    for part in [&data[..cut], &data[cut..]] {
        d.push(part);
        while let Ok(Some(frame)) = d.next_frame() {
            if let Ok(m) = decode::<EdgeToHub>(&frame) {
                let again: EdgeToHub = decode(&encode(&m).expect("re-encode")[4..]).expect("re-decode");
                assert_eq!(again, m);
            }
            let _ = decode::<HubToEdge>(&frame);
        }
    }
});
