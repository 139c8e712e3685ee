//! Creates the database and tables from the SQL in `clickhouse-init/` (compiled into the
//! binary, so a container needs no extra files) and checks the table matches the row format.

use anyhow::{bail, Context};
use clickhouse::Client;

use super::rowbinary::COLUMNS;

/// The files in `clickhouse-init/`, in the order they run.
pub const INIT_SQL: &[(&str, &str)] = &[
    (
        "01_database.sql",
        include_str!("../../clickhouse-init/01_database.sql"),
    ),
    (
        "02_events.sql",
        include_str!("../../clickhouse-init/02_events.sql"),
    ),
    (
        "03_keys.sql",
        include_str!("../../clickhouse-init/03_keys.sql"),
    ),
    (
        "04_usage_log.sql",
        include_str!("../../clickhouse-init/04_usage_log.sql"),
    ),
    (
        "05_rollup.sql",
        include_str!("../../clickhouse-init/05_rollup.sql"),
    ),
];

/// How long rows are kept: events (by their own timestamp) and the usage log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub events_days: u32,
    pub usage_days: u32,
}

/// The statements of the init files for `database` and `retention`.
///
/// The files name the database `adtrack` and the TTLs `INTERVAL 30 DAY` (events) and
/// `INTERVAL 90 DAY` (usage log), what the docker image runs as-is; all are rewritten here.
/// `database` is a checked identifier (see config).
pub fn statements(database: &str, retention: Retention) -> Vec<String> {
    INIT_SQL
        .iter()
        .flat_map(|(_, sql)| split_statements(sql))
        .map(|stmt| {
            stmt.replace(
                "DATABASE IF NOT EXISTS adtrack",
                &format!("DATABASE IF NOT EXISTS {database}"),
            )
            .replace(" adtrack.", &format!(" {database}."))
            // Through placeholders, so that one replacement cannot feed the other (an
            // events retention of 90 days must not become the usage log's).
            .replace("INTERVAL 30 DAY", "INTERVAL {events} DAY")
            .replace("INTERVAL 90 DAY", "INTERVAL {usage} DAY")
            .replace("{events}", &retention.events_days.to_string())
            .replace("{usage}", &retention.usage_days.to_string())
        })
        .collect()
}

fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Applies the init SQL. Every statement is `IF NOT EXISTS`, so this is safe on every start
/// and from several instances at once. Tables made under another retention get their TTL
/// changed to the configured one.
pub async fn apply(client: &Client, database: &str, retention: Retention) -> anyhow::Result<()> {
    // The database may not exist yet, so DDL runs without a default database.
    let server = client.clone().with_database("default");
    for stmt in statements(database, retention) {
        server
            .query(&stmt)
            .execute()
            .await
            .with_context(|| format!("applying schema statement: {}", first_line(&stmt)))?;
    }
    let ttls = [
        ("events", "toDateTime(timestamp)", retention.events_days),
        ("usage_log", "toDateTime(time)", retention.usage_days),
    ];
    for (table, column, days) in ttls {
        let engine = server
            .query("SELECT engine_full FROM system.tables WHERE database = ? AND name = ?")
            .bind(database)
            .bind(table)
            .fetch_one::<String>()
            .await
            .with_context(|| format!("reading the TTL of `{table}`"))?;
        if !engine.contains(&format!("toIntervalDay({days})")) {
            tracing::info!(
                table,
                days,
                "changing the table's TTL to the configured retention"
            );
            server
                .query(&format!(
                    "ALTER TABLE {database}.{table} MODIFY TTL {column} + INTERVAL {days} DAY"
                ))
                .execute()
                .await
                .with_context(|| format!("changing the TTL of `{table}`"))?;
        }
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct ColumnRow {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

/// Checks that `events` has exactly the columns, in the order, that rows are encoded with,
/// and that the key and usage tables exist.
pub async fn verify(client: &Client) -> anyhow::Result<()> {
    let columns = client
        .query("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'events' ORDER BY position")
        .fetch_all::<ColumnRow>()
        .await
        .context("reading the columns of table `events`")?;
    if columns.is_empty() {
        bail!("table `events` does not exist");
    }
    let found: Vec<(&str, &str)> = columns
        .iter()
        .map(|c| (c.name.as_str(), c.ty.as_str()))
        .collect();
    if found != COLUMNS {
        bail!("table `events` has columns {found:?}, expected {COLUMNS:?}");
    }
    let present: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() AND name IN ('tenants', 'api_keys', 'usage_log')")
        .fetch_all()
        .await
        .context("listing the tables")?;
    let missing: Vec<&str> = ["tenants", "api_keys", "usage_log"]
        .into_iter()
        .filter(|t| !present.iter().any(|p| p == t))
        .collect();
    if !missing.is_empty() {
        bail!("tables {missing:?} do not exist (clickhouse-init/03_keys.sql, 04_usage_log.sql)");
    }
    Ok(())
}

/// Asserts that `table` (a `CREATE TABLE` statement) declares each of `columns` with its type.
#[cfg(test)]
pub(crate) fn assert_declares(table: &str, columns: &[(&str, &str)]) {
    for (name, ty) in columns {
        let decl = format!("{name} ");
        let line = table
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&decl))
            .unwrap_or_else(|| panic!("column {name} missing"));
        assert!(line.contains(ty), "{name}: {line} lacks {ty}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_database_and_retention() {
        let stmts = statements(
            "test_db",
            Retention {
                events_days: 7,
                usage_days: 365,
            },
        );
        assert_eq!(stmts.len(), 9);
        assert!(stmts[0].contains("CREATE DATABASE IF NOT EXISTS test_db"));
        assert!(stmts[1].contains("CREATE TABLE IF NOT EXISTS test_db.events"));
        assert!(stmts[1].contains("INTERVAL 7 DAY"));
        assert!(stmts[4].contains("CREATE TABLE IF NOT EXISTS test_db.usage_log"));
        assert!(stmts[4].contains("INTERVAL 365 DAY"));
        assert!(stmts[8].contains("CREATE TABLE IF NOT EXISTS test_db.events_hourly_state"));
        let swapped = statements(
            "test_db",
            Retention {
                events_days: 90,
                usage_days: 30,
            },
        );
        assert!(swapped[1].contains("INTERVAL 90 DAY"), "{}", swapped[1]);
        assert!(swapped[4].contains("INTERVAL 30 DAY"), "{}", swapped[4]);
        assert!(!stmts.iter().any(|s| s.contains("adtrack")));
        // Statements are split at `;`: one inside a string would cut a statement in two.
        for stmt in &stmts {
            assert_eq!(stmt.matches('\'').count() % 2, 0, "a quote is cut: {stmt}");
        }
    }

    #[test]
    fn the_table_declares_every_encoded_column() {
        let retention = Retention {
            events_days: 30,
            usage_days: 90,
        };
        let table = &statements("adtrack", retention)[1];
        assert_declares(table, COLUMNS);
    }
}
