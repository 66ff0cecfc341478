//! Feed arbitrary bytes to the stream frame decoder and the manifest
//! validator: neither may panic, whatever a peer sends. A frame that does
//! decode must re-encode to a frame that decodes to the same message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shoal_core::config::Config;
use shoal_core::manifest::FileManifest;
use shoal_core::wire::{decode_frame, encode};

fuzz_target!(|data: &[u8]| {
    let max = Config::default().frame_bytes_max;
    let mut buf = BytesMut::from(data);
    while let Ok(Some(message)) = decode_frame(&mut buf, max) {
        let mut again = BytesMut::new();
        encode(&message, max, &mut again).expect("a decoded message re-encodes");
        let round = decode_frame(&mut again, max).expect("re-encoded frame decodes");
        assert_eq!(round.as_ref(), Some(&message));
    }
    let _ = FileManifest::from_bytes(data);
});
