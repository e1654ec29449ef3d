//! The PostgreSQL ceiling: binary COPY of the `logs` columns into an UNLOGGED table of the
//! same columns with no index, the fastest way PostgreSQL takes these rows.

use std::pin::pin;

use logpipe::event::Event;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{Client, NoTls};

/// The columns of `logs` in the order of the COPY statement, with their types.
const COLUMNS: &str = "id, user_id, api_key_id, service_name, level, severity_text, \
                       severity_number, message, \"timestamp\", received_at, attributes";
const TYPES: [Type; 11] = [
    Type::UUID,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::JSONB,
];

/// An UNLOGGED copy of the columns of `logs`, with a name of its own, on its own
/// connection. [`ScratchTable::drop_table`] removes it.
pub struct ScratchTable {
    client: Client,
    name: String,
}

impl ScratchTable {
    /// Connects to `url` and creates the table. Panics when either fails.
    pub async fn create(url: &str) -> ScratchTable {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        let name = format!("bench_copy_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE UNLOGGED TABLE {name} (LIKE logs)"))
            .await
            .expect("create the scratch table");
        ScratchTable { client, name }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Writes `events` with one binary COPY and returns the rows written.
    pub async fn copy(&self, events: &[Event]) -> Result<u64, tokio_postgres::Error> {
        let statement = format!("COPY {} ({COLUMNS}) FROM STDIN (FORMAT binary)", self.name);
        let sink = self.client.copy_in(&statement).await?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &TYPES));
        for event in events {
            let severity_number = event.severity_number as i16;
            let attributes = Json(&event.attributes);
            let row: [&(dyn ToSql + Sync); 11] = [
                &event.id,
                &event.user_id,
                &event.api_key_id,
                &event.service_name,
                &event.level,
                &event.severity.as_str(),
                &severity_number,
                &event.message,
                &event.timestamp,
                &event.received_at,
                &attributes,
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await
    }

    /// Empties the table, so that a long run does not measure a growing table.
    pub async fn truncate(&self) {
        self.client
            .batch_execute(&format!("TRUNCATE {}", self.name))
            .await
            .expect("truncate the scratch table");
    }

    pub async fn drop_table(&self) {
        let dropped = self
            .client
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.name))
            .await;
        if let Err(err) = dropped {
            eprintln!("cannot drop the scratch table {}: {err}", self.name);
        }
    }
}
