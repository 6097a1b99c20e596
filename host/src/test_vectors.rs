//! The wire notes' test vectors (docs/wire.md, TV-2 to TV-5) and a reader of
//! captured packets in hex, shared by the unit tests of every layer that
//! checks bytes against them (codec, connection, uTP, transport).

/// TV-2: a request by service name, as a Node client sends it.
pub const TV2: &str = r#"["3f2cf13b-da02-4abf-bb01-9306b37281a3","rpc_test","hello"]"#;
/// TV-3: the reply to TV-2.
pub const TV3: &str = r#"["3f2cf13b-da02-4abf-bb01-9306b37281a3",null,"world"]"#;
/// TV-4: a request to a punched address.
pub const TV4: &str = r#"["f5e82789-41d0-450f-88ed-cd320deb8fac","127.0.0.1:38772",{"length":10}]"#;
/// TV-5: the reply to TV-4.
pub const TV5: &str = r#"["f5e82789-41d0-450f-88ed-cd320deb8fac",null,[1,1,2,3,5,8,13,21,34,55]]"#;

/// The bytes of `text`, hex digits with any whitespace between them, as
/// the wire notes write captured packets (`41 00 4567 …`).
pub fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}
