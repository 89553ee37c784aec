//! The durable run store: agents, runs, steps, leases and stored responses, in SQLite (default)
//! or Postgres through one sqlx code path.
