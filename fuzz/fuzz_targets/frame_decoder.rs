//! Fuzzes the frame decoders: no input may panic, and whatever decodes must re-encode to the
//! very same bytes (the codec is strict, so there is exactly one encoding of every frame).
//!
//! Run bounded: `cargo +nightly fuzz run frame_decoder -- -max_total_time=60` (from `fuzz/`'s
//! parent directory).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_protocol::{ClientFrame, CloseCode, ServerFrame};

fuzz_target!(|data: &[u8]| {
    match ClientFrame::decode(data) {
        Ok(frame) => assert_eq!(frame.encode(), data),
        Err(e) => {
            let _ = CloseCode::for_decode_error(&e).reason();
        }
    }
    if let Ok(frame) = ServerFrame::decode(data) {
        assert_eq!(frame.encode(), data);
    }
});
