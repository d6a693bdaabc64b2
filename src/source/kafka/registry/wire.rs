//! The Confluent wire format: magic byte `0`, the schema id as 4 big-endian bytes, then the
//! serialized value. Everything here is a pure function of the bytes; a message that is not
//! framed this way is a [`DecodeError::Framing`] naming what is wrong.

use super::super::decode::DecodeError;

/// The schema id of a framed value and the serialized value after the header.
pub fn split(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload {
        [0, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [] => Err(DecodeError::Framing("empty value".into())),
        [0, ..] => Err(DecodeError::Framing(format!(
            "{} bytes: shorter than the 5-byte header (magic byte 0 + schema id)",
            payload.len()
        ))),
        [magic, ..] => Err(DecodeError::Framing(format!(
            "magic byte is {magic:#04x}, not 0x00: not Schema Registry framed (plain JSON or \
             Avro written without a registry serializer?)"
        ))),
    }
}

/// The schema id of a framed value, when it has a header.
pub fn schema_id(payload: &[u8]) -> Option<u32> {
    split(payload).ok().map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_gives_the_big_endian_id_and_the_rest() {
        assert_eq!(split(&[0, 0, 0, 1, 2, 9, 8]).unwrap(), (258, &[9u8, 8][..]));
        assert_eq!(split(&[0, 0, 0, 0, 7]).unwrap(), (7, &[][..]));
        let e = split(b"{\"a\":1}").unwrap_err().to_string();
        assert!(e.contains("magic byte is 0x7b"), "{e}");
        let e = split(&[0, 0, 1]).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
        assert!(split(&[]).is_err());
    }
}
