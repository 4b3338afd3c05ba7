//! End-to-end tests of the REST API against real NATS (JetStream), Redis and
//! a MongoDB-protocol server. Run them with `scripts/test.sh`, which starts
//! the services and exports their URLs; every test gets its own stream,
//! subject prefix, database and key prefix, so tests run in parallel.

mod browser;
mod cli;
mod embedded;
mod fuzz;
mod client;
mod cross_origin;
mod deploy;
mod heal;
mod helpers;
mod log_contract;

mod abuse;
mod authorization;
mod blocking;
mod bad_input;
mod concurrency;
mod edits;
mod idempotency;
mod multi_node;
mod openapi;
mod overload;
mod private_rooms;
mod projections;
mod push;
mod push_faults;
mod reactions;
mod replies;
mod rebuild;
mod rooms;
mod tokens;
mod unseen;
mod web_client;
