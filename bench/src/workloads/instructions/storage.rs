//! The database of one run, per backend: a new SQLite file in the bench work directory,
//! or a new PostgreSQL database created with psql (and dropped after the run).

use super::{Args, Backend};
use crate::workloads::Ctx;

/// A fresh database for one run.
pub(super) struct Storage {
    backend: Backend,
    /// `TETHER__STORAGE__URL`.
    pub(super) url: String,
    /// The SQLite file, or the PostgreSQL database's name.
    name: String,
}

impl Storage {
    pub(super) async fn create(ctx: &Ctx, args: &Args, backend: Backend) -> Result<Self, String> {
        let unique = format!(
            "{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        match backend {
            Backend::Sqlite => {
                let path = ctx
                    .env
                    .work_dir
                    .join(format!("instructions-bench-{unique}.db"));
                let name = path.display().to_string();
                Ok(Self {
                    backend,
                    url: format!("sqlite://{name}"),
                    name,
                })
            }
            Backend::Postgres => {
                let name = format!("tether_bench_{unique}");
                psql(&args.postgres, &format!("CREATE DATABASE {name}")).await?;
                Ok(Self {
                    backend,
                    url: format!("{}/{name}", args.postgres.trim_end_matches('/')),
                    name,
                })
            }
        }
    }

    /// Removes the database (after the server stopped).
    pub(super) async fn drop_it(self, args: &Args) {
        match self.backend {
            Backend::Sqlite => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.name));
                }
            }
            Backend::Postgres => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = psql(&args.postgres, &sql).await {
                    eprintln!("tether-bench instructions: {e}");
                }
            }
        }
    }
}

/// Runs one SQL statement with psql against the `postgres` database of `server`.
async fn psql(server: &str, sql: &str) -> Result<(), String> {
    let out = tokio::process::Command::new("psql")
        .arg("-d")
        .arg(format!("{}/postgres", server.trim_end_matches('/')))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .await
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql `{sql}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
