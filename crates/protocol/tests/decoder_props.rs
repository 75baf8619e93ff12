//! Property tests: the decoder turns any input into a frame or an error, never a panic.

use gateway_protocol::{ClientFrame, ErrorCode};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = ClientFrame::decode(&text);
    }

    #[test]
    fn json_shaped_input_decodes_or_names_a_code(
        kind in prop_oneof![Just("subscribe".to_owned()), Just("publish".to_owned()), Just("ping".to_owned()), Just("refresh".to_owned()), ".{0,12}"],
        channel in prop_oneof![Just("chat:lobby".to_owned()), ".{0,300}"],
        id in prop_oneof![Just("1".to_owned()), Just("\"x\"".to_owned()), Just("null".to_owned()), Just("{}".to_owned()), Just("[]".to_owned())],
        data in prop_oneof![Just("{\"a\":1}"), Just("null"), Just("\"s\""), Just("[")],
    ) {
        let channel = serde_json::Value::String(channel).to_string();
        let kind = serde_json::Value::String(kind).to_string();
        let text = format!(r#"{{"type":{kind},"channel":{channel},"id":{id},"data":{data}}}"#);
        match ClientFrame::decode(&text) {
            Ok(frame) => prop_assert!(frame.id().is_none() || id == "1" || id == "\"x\""),
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::BadChannel)),
        }
    }
}
