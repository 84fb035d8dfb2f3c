//! The proxy's framing, the pooled relay's boundary tracker and the token parser on arbitrary
//! bytes: never a panic, never unbounded memory, whatever a client sends.
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
    // The pooled relay's boundary tracker: the same answer whether the bytes come at once or one
    // by one, and a Terminate offset inside the data.
    let mut whole = proto::Framer::default();
    let at_once = whole.feed(data);
    let mut split = proto::Framer::default();
    let mut one_by_one = Ok(None);
    for (i, b) in data.iter().enumerate() {
        match split.feed(std::slice::from_ref(b)) {
            Ok(None) => {}
            Ok(Some(at)) => {
                one_by_one = Ok(Some(i + at));
                break;
            }
            Err(e) => {
                one_by_one = Err(e);
                break;
            }
        }
    }
    match (&at_once, &one_by_one) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("framer differs: at once {at_once:?}, one by one {one_by_one:?}"),
    }
    if let Ok(Some(at)) = at_once {
        assert!(at < data.len() && data[at] == b'X');
    }
    if at_once.is_ok() {
        assert_eq!(whole.last_ready, split.last_ready);
        assert_eq!(whole.at_boundary(), split.at_boundary());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gprxy_core::peek_unverified(text);
    }
});
