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
];

/// The statements of the init files for `database` and a retention of `retention_days`.
///
/// The files name the database `adtrack` and the TTL `INTERVAL 30 DAY` (what the docker image
/// runs as-is); both are rewritten here. `database` is a checked identifier (see config).
pub fn statements(database: &str, retention_days: u32) -> Vec<String> {
    INIT_SQL
        .iter()
        .flat_map(|(_, sql)| split_statements(sql))
        .map(|stmt| {
            stmt.replace(
                "DATABASE IF NOT EXISTS adtrack",
                &format!("DATABASE IF NOT EXISTS {database}"),
            )
            .replace(" adtrack.", &format!(" {database}."))
            .replace("INTERVAL 30 DAY", &format!("INTERVAL {retention_days} DAY"))
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
/// and from several instances at once.
pub async fn apply(client: &Client, database: &str, retention_days: u32) -> anyhow::Result<()> {
    // The database may not exist yet, so DDL runs without a default database.
    let server = client.clone().with_database("default");
    for stmt in statements(database, retention_days) {
        server
            .query(&stmt)
            .execute()
            .await
            .with_context(|| format!("applying schema statement: {}", first_line(&stmt)))?;
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

/// Checks that `events` has exactly the columns, in the order, that rows are encoded with.
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_database_and_retention() {
        let stmts = statements("test_db", 7);
        assert_eq!(stmts.len(), 2);
        assert!(stmts[0].contains("CREATE DATABASE IF NOT EXISTS test_db"));
        assert!(stmts[1].contains("CREATE TABLE IF NOT EXISTS test_db.events"));
        assert!(stmts[1].contains("INTERVAL 7 DAY"));
        assert!(!stmts.iter().any(|s| s.contains("adtrack")));
    }

    #[test]
    fn the_table_declares_every_encoded_column() {
        let table = &statements("adtrack", 30)[1];
        for (name, ty) in COLUMNS {
            let decl = format!("{name} ");
            let line = table
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&decl))
                .unwrap_or_else(|| panic!("column {name} missing"));
            assert!(line.contains(ty), "{name}: {line} lacks {ty}");
        }
    }
}
