#![no_main]
//! What the host reads from a guest's agent: length-prefixed frames of
//! `Response` messages (and the agent, of `Request`s), one after another
//! until the stream ends or a frame is refused.
use zygote_agent_api::frame::read_frame;
use zygote_agent_api::{Request, Response};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut stream = std::io::Cursor::new(data);
    while read_frame::<Response, _>(&mut stream).is_ok() {}
    let mut stream = std::io::Cursor::new(data);
    while read_frame::<Request, _>(&mut stream).is_ok() {}
});
