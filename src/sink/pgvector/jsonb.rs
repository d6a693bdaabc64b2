//! JSON text sent as `jsonb` as it is, so the payload keeps every number's digits.
//!
//! tokio-postgres binds `jsonb` from a `serde_json::Value`, whose numbers are `f64`/`i64`/`u64`
//! (this crate does not enable serde_json's `arbitrary_precision`, see
//! `source::kafka::row_json`): a 30-digit integer or a 40-digit decimal would be rounded on the
//! way. The payload is written as JSON text by the event model (numbers as the source wrote
//! them) and sent in `jsonb`'s binary form, a version byte and the text; PostgreSQL's `jsonb`
//! stores numbers as `numeric`, exactly.

use bytes::BufMut as _;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// A JSON document, known to be valid, bound to a `json`/`jsonb` parameter as its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JsonbText(pub String);

impl ToSql for JsonbText {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // jsonb's binary format: version 1, then the text.
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    to_sql_checked!();
}
