//! Conversions between Rust values and their column representation.
//!
//! Decoding never panics: a value the code cannot read is
//! [`StoreError::Corrupt`], naming the table, row and column.

use crate::StoreError;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Decode, Row, Type};
use std::fmt::Display;
use std::str::FromStr;

pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into() }
}

/// A value that cannot be written (e.g. a `u64` above `i64::MAX`).
/// Whether `e` is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

pub(crate) fn unencodable(what: impl Display) -> StoreError {
    StoreError::Query(sqlx::Error::Encode(format!("cannot store {what}").into()))
}

/// Reads one column of a row; a type mismatch is `Corrupt`.
pub(crate) struct RowReader<'r> {
    row: &'r AnyRow,
    /// e.g. `instances row i-0192...`, for error messages.
    ctx: String,
}

impl<'r> RowReader<'r> {
    pub(crate) fn new(row: &'r AnyRow, ctx: impl Into<String>) -> Self {
        Self {
            row,
            ctx: ctx.into(),
        }
    }

    pub(crate) fn set_ctx(&mut self, ctx: impl Into<String>) {
        self.ctx = ctx.into();
    }

    pub(crate) fn get<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: for<'a> Decode<'a, Any> + Type<Any>,
    {
        self.row.try_get::<T, _>(col).map_err(|e| match e {
            sqlx::Error::ColumnDecode { source, .. } => {
                corrupt(format!("{}: column {col}: {source}", self.ctx))
            }
            other => StoreError::Query(other),
        })
    }

    /// A TEXT column holding a value parsed with `FromStr`.
    pub(crate) fn parsed<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s: String = self.get(col)?;
        s.parse()
            .map_err(|e| corrupt(format!("{}: column {col}: {s:?}: {e}", self.ctx)))
    }

    pub(crate) fn parsed_opt<T>(&self, col: &str) -> Result<Option<T>, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s: Option<String> = self.get(col)?;
        s.map(|s| {
            s.parse()
                .map_err(|e| corrupt(format!("{}: column {col}: {s:?}: {e}", self.ctx)))
        })
        .transpose()
    }

    /// A TEXT column holding a serde unit-variant enum (a proto type without `FromStr`).
    pub(crate) fn serde_enum<T: DeserializeOwned>(&self, col: &str) -> Result<T, StoreError> {
        let s: String = self.get(col)?;
        serde_enum_from_text(&s)
            .map_err(|e| corrupt(format!("{}: column {col}: {s:?}: {e}", self.ctx)))
    }

    pub(crate) fn serde_enum_opt<T: DeserializeOwned>(
        &self,
        col: &str,
    ) -> Result<Option<T>, StoreError> {
        let s: Option<String> = self.get(col)?;
        s.map(|s| {
            serde_enum_from_text(&s)
                .map_err(|e| corrupt(format!("{}: column {col}: {s:?}: {e}", self.ctx)))
        })
        .transpose()
    }

    pub(crate) fn time(&self, col: &str) -> Result<DateTime<Utc>, StoreError> {
        let ms: i64 = self.get(col)?;
        from_millis(ms).ok_or_else(|| corrupt(format!("{}: column {col}: time {ms}", self.ctx)))
    }

    pub(crate) fn time_opt(&self, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let ms: Option<i64> = self.get(col)?;
        ms.map(|ms| {
            from_millis(ms).ok_or_else(|| corrupt(format!("{}: column {col}: time {ms}", self.ctx)))
        })
        .transpose()
    }

    /// A BIGINT 0/1 column.
    pub(crate) fn flag(&self, col: &str) -> Result<bool, StoreError> {
        match self.get::<i64>(col)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(corrupt(format!("{}: column {col}: flag {v}", self.ctx))),
        }
    }

    /// A BIGINT column narrowed to a smaller or unsigned integer.
    pub(crate) fn int<T: TryFrom<i64>>(&self, col: &str) -> Result<T, StoreError> {
        let v: i64 = self.get(col)?;
        T::try_from(v).map_err(|_| corrupt(format!("{}: column {col}: out of range {v}", self.ctx)))
    }
}

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn millis_opt(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(millis)
}

fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

pub(crate) fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// A `u64` as BIGINT.
pub(crate) fn to_i64<T: TryInto<i64> + Copy + Display>(
    v: T,
    what: &str,
) -> Result<i64, StoreError> {
    v.try_into()
        .map_err(|_| unencodable(format_args!("{what} = {v}: above the BIGINT range")))
}

/// The serde name of a unit-variant enum, e.g. `EngineStatus::Ready` → `ready`.
pub(crate) fn serde_enum_text<T: Serialize>(v: &T) -> Result<String, StoreError> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(unencodable(format_args!(
            "{other}: not a unit enum variant"
        ))),
        Err(e) => Err(unencodable(e)),
    }
}

fn serde_enum_from_text<T: DeserializeOwned>(s: &str) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
}

/// An optional DOUBLE PRECISION to bind.
///
/// sqlx 0.8's Any driver sends a `None::<f64>` to PostgreSQL as a `float4`
/// NULL (its Real/Double mapping of NULLs is swapped), so a cached statement
/// first run with NULL then fails on a real value ("incorrect binary data
/// format"). A `None::<f32>` goes out as a `float8` NULL.
pub(crate) fn bind_opt_f64<'q>(
    q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    v: Option<f64>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    match v {
        Some(v) => q.bind(v),
        None => q.bind(None::<f32>),
    }
}
