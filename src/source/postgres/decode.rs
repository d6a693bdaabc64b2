//! pgoutput message decoding (protocol v1, plus v2's streamed in-progress transactions) and
//! text-format value conversion.
//!
//! The server sends column values in their text output form; [`convert`] turns the common types
//! into typed [`Value`]s and keeps anything else as text, so no value is ever lost. The one value
//! that has no [`Value`] is text whose bytes are not UTF-8 (a `SQL_ASCII` database stores bytes
//! unchecked): [`convert_raw`] refuses it with a [`ValueError`], and the source dead-letters the
//! row, its values kept byte for byte as a COPY text line ([`copy_text_line`]).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use crate::event::{JsonText, Lsn, RowSchema, Value, ValueType};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// One column of a relation as announced by a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct RelColumn {
    pub name: String,
    pub type_oid: u32,
    pub is_key: bool,
}

/// A relation (table) as announced by a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<RelColumn>,
}

/// One column value of a tuple, before type conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    Null,
    UnchangedToast,
    /// The value's text output form, as the server sent it (UTF-8 unless the database let other
    /// bytes in).
    Text(Vec<u8>),
}

/// A column value that cannot become a [`Value`]; the row is dead-lettered, never altered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column} ({type_name}) {problem}")]
pub struct ValueError {
    pub column: String,
    pub type_name: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_ts: DateTime<Utc>,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: DateTime<Utc>,
    },
    Relation(Relation),
    Type {
        oid: u32,
        name: String,
    },
    Insert {
        rel: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is the old key (`K`) or the whole old row (`O`, REPLICA IDENTITY FULL) when sent.
    Update {
        rel: u32,
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        rel: u32,
        old: Vec<TupleValue>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Protocol v2: a block of an in-progress transaction's changes follows.
    StreamStart {
        xid: u32,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: DateTime<Utc>,
    },
    /// `subxid == xid` aborts the whole transaction, otherwise one subtransaction.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    /// A logical decoding message (`pg_logical_emit_message`), sent when the `messages` option
    /// is on: the on-demand snapshot's watermarks travel as such.
    Logical {
        transactional: bool,
        prefix: String,
        content: Vec<u8>,
    },
    /// Origin messages: nothing to emit.
    Other,
}

/// The first byte of messages that, inside a stream block, carry the transaction id.
pub fn has_stream_xid(tag: u8) -> bool {
    matches!(tag, b'I' | b'U' | b'D' | b'T' | b'R' | b'Y' | b'M')
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!("truncated: wanted {n} bytes")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn ts(&mut self) -> Result<DateTime<Utc>, DecodeError> {
        let us = self.u64()? as i64;
        DateTime::from_timestamp_micros(us.saturating_add(PG_EPOCH_OFFSET_US))
            .ok_or_else(|| DecodeError(format!("timestamp out of range: {us}")))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    TupleValue::Text(self.take(len)?.to_vec())
                }
                k => return Err(DecodeError(format!("unknown tuple column kind {k}"))),
            });
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message sent outside a stream block.
pub fn parse(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8()?;
    body(tag, &mut r)
}

/// Decodes one message sent inside a stream block: changes, relations and types carry the
/// (sub)transaction id first, which is returned beside the message.
pub fn parse_streamed(data: &[u8]) -> Result<(Option<u32>, Message), DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8()?;
    let xid = if has_stream_xid(tag) {
        Some(r.u32()?)
    } else {
        None
    };
    Ok((xid, body(tag, &mut r)?))
}

fn body(tag: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(match tag {
        b'S' => {
            let xid = r.u32()?;
            Message::StreamStart { xid }
        }
        b'E' => Message::StreamStop,
        b'c' => {
            let xid = r.u32()?;
            r.u8()?;
            Message::StreamCommit {
                xid,
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_ts: r.ts()?,
            }
        }
        b'A' => Message::StreamAbort {
            xid: r.u32()?,
            subxid: r.u32()?,
        },
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_ts: r.ts()?,
            xid: r.u32()?,
        },
        b'C' => {
            r.u8()?;
            Message::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_ts: r.ts()?,
            }
        }
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                r.u32()?;
                columns.push(RelColumn {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                columns,
            })
        }
        b'Y' => {
            let oid = r.u32()?;
            r.cstr()?;
            Message::Type {
                oid,
                name: r.cstr()?,
            }
        }
        b'I' => {
            let rel = r.u32()?;
            expect(r, b'N')?;
            Message::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError(format!("update: unexpected tuple kind {kind}")));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(DecodeError(format!("delete: unexpected tuple kind {kind}")));
            }
            Message::Delete {
                rel,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            r.u8()?;
            let rels = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { rels }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            r.u64()?;
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            Message::Logical {
                transactional,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        _ => Message::Other,
    })
}

fn expect(r: &mut Reader<'_>, want: u8) -> Result<(), DecodeError> {
    let got = r.u8()?;
    if got == want {
        Ok(())
    } else {
        Err(DecodeError(format!(
            "expected tuple kind {}, got {got}",
            want as char
        )))
    }
}

/// The element type of the built-in array types we decode.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        1009 => 25,
        1015 => 1043,
        1014 => 1042,
        2951 => 2950,
        1182 => 1082,
        1115 => 1114,
        1185 => 1184,
        199 => 114,
        3807 => 3802,
        1001 => 17,
        _ => return None,
    })
}

/// Converts a text-format value of type `oid` (`type_names` holds names announced by Type
/// messages, for extension types such as pgvector's `vector`). Unknown types and values that do
/// not parse stay text.
/// The type [`convert`] gives the non-null values of a column of type `oid` (text for types it
/// does not convert).
pub fn value_type(oid: u32, type_names: &HashMap<u32, String>) -> ValueType {
    if array_element(oid).is_some() {
        return ValueType::Array;
    }
    match oid {
        16 => ValueType::Bool,
        21 => ValueType::Int16,
        23 => ValueType::Int32,
        20 => ValueType::Int64,
        700 => ValueType::Float32,
        701 => ValueType::Float64,
        1700 => ValueType::Numeric,
        2950 => ValueType::Uuid,
        1082 => ValueType::Date,
        1114 => ValueType::Timestamp,
        1184 => ValueType::TimestampTz,
        114 | 3802 => ValueType::Json,
        17 => ValueType::Bytes,
        _ if type_names.get(&oid).map(String::as_str) == Some("vector") => ValueType::Vector,
        _ => ValueType::Text,
    }
}

/// The typed columns of a relation.
pub fn row_schema<'a>(
    columns: impl IntoIterator<Item = (&'a str, u32)>,
    type_names: &HashMap<u32, String>,
) -> RowSchema {
    RowSchema {
        columns: columns
            .into_iter()
            .map(|(name, oid)| (name.to_owned(), value_type(oid, type_names)))
            .collect(),
    }
}

pub fn convert(oid: u32, text: &str, type_names: &HashMap<u32, String>) -> Value {
    if let Some(elem) = array_element(oid) {
        return match parse_array(text) {
            Some(items) => Value::Array(
                items
                    .into_iter()
                    .map(|i| match i {
                        None => Value::Null,
                        Some(s) => convert(elem, &s, type_names),
                    })
                    .collect(),
            ),
            None => Value::Text(text.into()),
        };
    }
    let parsed = match oid {
        16 => Some(Value::Bool(text == "t")),
        21 => text.parse().ok().map(Value::Int16),
        23 => text.parse().ok().map(Value::Int32),
        20 => text.parse().ok().map(Value::Int64),
        700 => text.parse().ok().map(Value::Float32),
        701 => text.parse().ok().map(Value::Float64),
        1700 => Some(Value::Numeric(text.into())),
        2950 => uuid::Uuid::parse_str(text).ok().map(Value::Uuid),
        // Text types: no extension type to look up.
        25 | 1043 | 1042 | 19 => None,
        1082 => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .map(Value::Date),
        1114 => iso_timestamp(text)
            .filter(|(_, offset)| offset.is_none())
            .map(|(t, _)| t)
            .or_else(|| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok())
            .map(Value::Timestamp),
        1184 => match iso_timestamp(text) {
            Some((t, Some(offset))) => Some(t - chrono::TimeDelta::seconds(offset.into())),
            _ => DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .ok()
                .map(|t| t.naive_utc()),
        }
        .map(|t| Value::TimestampTz(t.and_utc())),
        114 | 3802 => JsonText::parse(text).ok().map(Value::Json),
        17 => text
            .strip_prefix("\\x")
            .and_then(hex_decode)
            .map(Value::Bytes),
        _ if type_names.get(&oid).map(String::as_str) == Some("vector") => text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .map(Value::Vector),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::Text(text.into()))
}

/// PostgreSQL's ISO output of a timestamp (`YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]]`), read
/// by position: the offset in seconds east of UTC when one is written. `None` for anything else
/// (BC dates, years past 9999, `infinity`), which chrono's format parser then reads: the common
/// case costs a tenth of it, and snapshots and streams hold timestamps in every other row.
fn iso_timestamp(text: &str) -> Option<(NaiveDateTime, Option<i32>)> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let (mut i, mut nanos) = (19, 0u32);
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) && i - start < 9 {
            nanos = nanos * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        if i == start {
            return None;
        }
        nanos *= 10u32.pow((9 - (i - start)) as u32);
    }
    let time =
        chrono::NaiveTime::from_hms_nano_opt(num(11..13)?, num(14..16)?, num(17..19)?, nanos)?;
    let offset = match b.get(i) {
        None => None,
        Some(&sign @ (b'+' | b'-')) => {
            let h = num(i + 1..i + 3)?;
            let (m, s, end) = match (b.get(i + 3), b.get(i + 6)) {
                (None, _) => (0, 0, i + 3),
                (Some(b':'), None) => (num(i + 4..i + 6)?, 0, i + 6),
                (Some(b':'), Some(b':')) => (num(i + 4..i + 6)?, num(i + 7..i + 9)?, i + 9),
                _ => return None,
            };
            if end != b.len() {
                return None;
            }
            let secs = (h * 3600 + m * 60 + s) as i32;
            Some(if sign == b'-' { -secs } else { secs })
        }
        Some(_) => return None,
    };
    Some((NaiveDateTime::new(date, time), offset))
}

/// [`convert`] for a value as it arrived: `Err` when its bytes are not UTF-8, which no [`Value`]
/// can hold without changing them.
pub fn convert_raw(
    column: &str,
    oid: u32,
    raw: &[u8],
    type_names: &HashMap<u32, String>,
) -> Result<Value, ValueError> {
    match std::str::from_utf8(raw) {
        Ok(text) => Ok(convert(oid, text, type_names)),
        Err(e) => Err(ValueError {
            column: column.to_owned(),
            type_name: type_name(oid, type_names),
            problem: format!(
                "is not valid UTF-8 (byte 0x{:02x} at offset {})",
                raw.get(e.valid_up_to()).copied().unwrap_or_default(),
                e.valid_up_to()
            ),
        }),
    }
}

/// A type's name for messages: built-in types by name, others as announced, else the OID.
pub fn type_name(oid: u32, type_names: &HashMap<u32, String>) -> String {
    let builtin = match oid {
        16 => "boolean",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        114 => "json",
        700 => "real",
        701 => "double precision",
        1042 => "character",
        1043 => "character varying",
        1082 => "date",
        1114 => "timestamp",
        1184 => "timestamptz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        _ => {
            return match (type_names.get(&oid), array_element(oid)) {
                (Some(name), _) => name.clone(),
                (None, Some(elem)) => format!("{}[]", type_name(elem, type_names)),
                (None, None) => format!("type {oid}"),
            };
        }
    };
    builtin.to_owned()
}

/// A row's values in PostgreSQL's COPY text format (tab-separated, `\N` for NULL, backslash
/// escapes, no line end), bytes kept as they are: how a dead-lettered row's raw input is kept,
/// loadable again with `COPY … FROM`.
pub fn copy_text_line<'a>(values: impl IntoIterator<Item = Option<&'a [u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let Some(bytes) = v else {
            out.extend_from_slice(b"\\N");
            continue;
        };
        for &b in bytes {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
    }
    out
}

fn hex_decode(h: &str) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a one-dimensional array literal (`{1,NULL,"a b","q\"uote"}`); `None` for anything
/// else (multi-dimensional arrays stay text).
fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '\\' => s.push(chars.next()?),
                    '"' => break,
                    c => s.push(c),
                }
            }
            out.push(Some(s));
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' {
                    return None;
                }
                s.push(c);
                chars.next();
            }
            out.push(if s == "NULL" { None } else { Some(s) });
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(oid: u32, s: &str) -> Value {
        convert(oid, s, &HashMap::new())
    }

    #[test]
    fn common_types_are_typed() {
        assert_eq!(conv(23, "42"), Value::Int32(42));
        assert_eq!(conv(20, "-9000000000"), Value::Int64(-9_000_000_000));
        assert_eq!(conv(16, "f"), Value::Bool(false));
        assert_eq!(conv(1700, "1.50"), Value::Numeric("1.50".into()));
        assert_eq!(conv(17, "\\x00ff"), Value::Bytes(vec![0, 255]));
        assert_eq!(
            conv(1184, "2024-01-02 03:04:05.5+00"),
            Value::TimestampTz("2024-01-02T03:04:05.5Z".parse().unwrap())
        );
        assert_eq!(
            conv(3802, r#"{"a": 1}"#),
            // Kept as PostgreSQL wrote it.
            Value::Json(JsonText::parse(r#"{"a": 1}"#).unwrap())
        );
        assert_eq!(conv(600, "(1,2)"), Value::Text("(1,2)".into()));
    }

    #[test]
    fn timestamps_read_by_position_equal_chrono_s_format_parser() {
        for text in [
            "2024-01-02 03:04:05+00",
            "2024-01-02 03:04:05.5+00",
            "2024-01-02 03:04:05.123456+00",
            "1999-12-31 23:59:59.000001-08",
            "2024-06-30 12:00:00+05:30",
            "2024-02-29 00:00:00.1-03:30",
        ] {
            let chrono = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map(|t| Value::TimestampTz(t.with_timezone(&Utc)))
                .unwrap();
            assert_eq!(conv(1184, text), chrono, "{text}");
        }
        for text in ["2024-01-02 03:04:05", "2024-01-02 03:04:05.250"] {
            let chrono = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap();
            assert_eq!(conv(1114, text), Value::Timestamp(chrono), "{text}");
        }
        // An offset with seconds (local mean time), which chrono's `%#z` does not read.
        assert_eq!(
            conv(1184, "1900-01-01 00:00:00+00:19:32"),
            Value::TimestampTz("1899-12-31T23:40:28Z".parse().unwrap())
        );
        // Not a valid date or time: kept as text, as before.
        for text in [
            "2023-02-29 00:00:00+00",
            "2024-01-02 24:00:01+00",
            "2024-01-02 03:04:05.+00",
            "2024-01-02 03:04:05+0",
        ] {
            assert_eq!(conv(1184, text), Value::Text(text.into()), "{text}");
        }
        // An offset on a `timestamp` is not a `timestamp`.
        assert!(matches!(
            conv(1114, "2024-01-02 03:04:05+00"),
            Value::Text(_)
        ));
    }

    #[test]
    fn arrays_and_vectors() {
        assert_eq!(
            conv(1009, r#"{a,NULL,"b c","q\"x"}"#),
            Value::Array(vec![
                Value::Text("a".into()),
                Value::Null,
                Value::Text("b c".into()),
                Value::Text("q\"x".into())
            ])
        );
        assert_eq!(conv(1007, "{}"), Value::Array(vec![]));
        assert_eq!(conv(1007, "{{1},{2}}"), Value::Text("{{1},{2}}".into()));
        let names = HashMap::from([(99999, "vector".to_string())]);
        assert_eq!(
            convert(99999, "[1,2.5]", &names),
            Value::Vector(vec![1.0, 2.5])
        );
    }

    #[test]
    fn valid_values_without_a_typed_counterpart_keep_their_text() {
        // PostgreSQL accepts these; chrono cannot hold them, so they stay exact as text.
        assert_eq!(conv(1184, "infinity"), Value::Text("infinity".into()));
        assert_eq!(conv(1082, "-infinity"), Value::Text("-infinity".into()));
        assert_eq!(
            conv(1082, "300000-01-01"),
            Value::Text("300000-01-01".into())
        );
        assert_eq!(
            conv(1114, "0044-03-15 00:00:00 BC"),
            Value::Text("0044-03-15 00:00:00 BC".into())
        );
        assert_eq!(conv(1700, "NaN"), Value::Numeric("NaN".into()));
        assert!(matches!(conv(701, "NaN"), Value::Float64(x) if x.is_nan()));
    }

    #[test]
    fn bytes_that_are_not_utf8_arrive_unchanged_and_are_a_value_error() {
        let names = HashMap::new();
        let msg = b"I\0\0\0\x01N\0\x02t\0\0\0\x011t\0\0\0\x04caf\xe9";
        let Message::Insert { new, .. } = parse(msg).unwrap() else {
            panic!("an insert")
        };
        assert_eq!(new[1], TupleValue::Text(b"caf\xe9".to_vec()));
        let err = convert_raw("body", 25, b"caf\xe9", &names).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column body (text) is not valid UTF-8 (byte 0xe9 at offset 3)"
        );
        assert_eq!(convert_raw("n", 23, b"7", &names), Ok(Value::Int32(7)));
        assert_eq!(type_name(1009, &names), "text[]");
        assert_eq!(
            copy_text_line([Some(&b"a\tb\\c\nd"[..]), None, Some(b"\xff")]),
            b"a\\tb\\\\c\\nd\t\\N\t\xff"
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        assert!(parse(b"B\0\0").is_err());
        assert!(parse(b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab").is_err());
        assert_eq!(
            parse(b"I\0\0\0\x01N\0\x02n\x74\0\0\0\x02ab").unwrap(),
            Message::Insert {
                rel: 1,
                new: vec![TupleValue::Null, TupleValue::Text("ab".into())]
            }
        );
    }

    #[test]
    fn logical_messages_carry_prefix_and_content_in_and_out_of_stream_blocks() {
        let plain = b"M\x01\0\0\0\0\0\0\0\x2atributary\0\0\0\0\x02{}";
        assert_eq!(
            parse(plain).unwrap(),
            Message::Logical {
                transactional: true,
                prefix: "tributary".into(),
                content: b"{}".to_vec()
            }
        );
        let streamed = b"M\0\0\0\x07\0\0\0\0\0\0\0\0\x2ap\0\0\0\0\x01x";
        assert_eq!(
            parse_streamed(streamed).unwrap(),
            (
                Some(7),
                Message::Logical {
                    transactional: false,
                    prefix: "p".into(),
                    content: b"x".to_vec()
                }
            )
        );
        assert!(parse(b"M\x01\0\0\0\0\0\0\0\x2ap\0\0\0\0\x09ab").is_err());
    }
}
