//! The proxy's framing and the token parser on arbitrary bytes: never a panic, never unbounded
//! memory, whatever a client sends.
#![no_main]

use bytes::BytesMut;
use gprxy_passthrough::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = BytesMut::from(data);
    while let Ok(Some(_)) = proto::parse_first_packet(&mut b) {}
    let mut b = BytesMut::from(data);
    while let Ok(Some(m)) = proto::parse_message(&mut b, proto::MAX_SASL_MESSAGE, "fuzz") {
        let _ = proto::auth_code(&m);
        let _ = proto::sasl_mechanisms(&m);
        let _ = proto::parse_sasl_initial(&m);
        let _ = proto::error_fields(&m);
        let _ = proto::backend_key(&m);
    }
    let _ = proto::oauthbearer_token(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gprxy_core::peek_unverified(text);
    }
});
