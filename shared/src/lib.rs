//! Widget Store's shared library: configuration helpers, the database pool
//! and migrations, the durable workflow engine, and the store's SQL.

#![warn(missing_docs)]

pub mod db;
pub mod engine;
pub mod shutdown;
pub mod store;
pub mod telemetry;
