//! Which version of each rebuildable projection is live, and which is being
//! built: a pointer document per projection in the views database's `meta`
//! collection, `{_id: "<projection>", active: N, building: M | null}`.
//!
//! Every node re-reads the pointers every second and re-points its
//! [`Switch`]es: readers move to a new version in one step, and while a
//! version is being built every node writes its own events to it too.

use std::sync::Arc;
use std::time::Duration;

use mongodb::Database;
use mongodb::bson::{Document, doc};
use natter_projections::StoreError;
use natter_projections::mongo::MongoViews;
use natter_projections::redis_counts::RedisCounts;
use natter_projections::switch::Switch;
use redis::aio::ConnectionManager;
use tokio::sync::watch;

pub const VIEWS: &str = "mongo-views";
pub const COUNTS: &str = "redis-unseen";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub active: u32,
    pub building: Option<u32>,
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

fn int(d: &Document, key: &str) -> Option<u32> {
    d.get_i64(key).ok().or_else(|| d.get_i32(key).ok().map(i64::from)).and_then(|v| u32::try_from(v).ok())
}

pub async fn read_pointer(db: &Database, projection: &str) -> Result<Pointer, StoreError> {
    let doc = db.collection::<Document>("meta").find_one(doc! {"_id": projection}).await.map_err(unavailable)?;
    Ok(match doc {
        Some(d) => Pointer { active: int(&d, "active").unwrap_or(1), building: int(&d, "building").filter(|b| *b > 0) },
        None => Pointer { active: 1, building: None },
    })
}

pub async fn write_pointer(db: &Database, projection: &str, p: Pointer) -> Result<(), StoreError> {
    let building = i64::from(p.building.unwrap_or(0));
    db.collection::<Document>("meta")
        .update_one(doc! {"_id": projection}, doc! {"$set": {"active": i64::from(p.active), "building": building}})
        .upsert(true)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// The `meta` document saying the views hold no reply previews.
const PREVIEWS_CLEARED: &str = "reply-previews-cleared";

/// Once per database: empties the reply previews that views written by
/// builds before previews were read when shown still hold (the live
/// version and one being built; a version built since holds none).
async fn clear_reply_previews(db: &Database, p: Pointer) -> Result<(), StoreError> {
    let meta = db.collection::<Document>("meta");
    if meta.find_one(doc! {"_id": PREVIEWS_CLEARED}).await.map_err(unavailable)?.is_some() {
        return Ok(());
    }
    let mut cleared = 0;
    for version in std::iter::once(p.active).chain(p.building) {
        cleared += MongoViews::clear_reply_previews(db, version).await?;
    }
    if cleared > 0 {
        tracing::info!(cleared, "emptied the reply previews that views written by an older natter held (previews are read when shown)");
    }
    meta.update_one(doc! {"_id": PREVIEWS_CLEARED}, doc! {"$set": {"at": chrono::Utc::now().to_rfc3339()}}).upsert(true).await.map_err(unavailable)?;
    Ok(())
}

pub struct Versions {
    db: Database,
    redis: ConnectionManager,
    redis_base: String,
    pub views: Arc<Switch<MongoViews>>,
    pub counts: Arc<Switch<RedisCounts>>,
}

impl Versions {
    pub fn counts_at(redis: &ConnectionManager, base: &str, version: u32) -> RedisCounts {
        RedisCounts::new(redis.clone(), RedisCounts::versioned_prefix(base, version))
    }

    /// Opens the live versions; `limit` bounds every call a node makes to
    /// them (none for the command-line tools).
    pub async fn open(db: Database, redis: ConnectionManager, redis_base: &str, limit: Option<Duration>) -> Result<Versions, StoreError> {
        let (vp, cp) = (read_pointer(&db, VIEWS).await?, read_pointer(&db, COUNTS).await?);
        clear_reply_previews(&db, vp).await?;
        let mut views = Switch::new(VIEWS, vp.active, Arc::new(MongoViews::open_version(&db, vp.active).await?));
        let mut counts = Switch::new(COUNTS, cp.active, Arc::new(Self::counts_at(&redis, redis_base, cp.active)));
        if let Some(limit) = limit {
            (views, counts) = (views.bounded_by(limit), counts.bounded_by(limit));
        }
        let (views, counts) = (Arc::new(views), Arc::new(counts));
        let versions = Versions { db, redis, redis_base: redis_base.to_owned(), views, counts };
        versions.refresh().await?;
        Ok(versions)
    }

    /// Re-reads the pointers and re-points the switches.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let vp = read_pointer(&self.db, VIEWS).await?;
        if vp.active != self.views.active_version() || vp.building != self.views.building_version() {
            if vp.active != self.views.active_version() {
                tracing::info!(from = self.views.active_version(), to = vp.active, "views switched to a rebuilt version");
            }
            let active = (vp.active, Arc::new(MongoViews::open_version(&self.db, vp.active).await?));
            let building = match vp.building {
                Some(v) => Some((v, Arc::new(MongoViews::open_version(&self.db, v).await?))),
                None => None,
            };
            self.views.set_both(active, building);
        }
        let cp = read_pointer(&self.db, COUNTS).await?;
        if cp.active != self.counts.active_version() || cp.building != self.counts.building_version() {
            if cp.active != self.counts.active_version() {
                tracing::info!(from = self.counts.active_version(), to = cp.active, "unread counts switched to a rebuilt version");
            }
            let at = |v: u32| (v, Arc::new(Self::counts_at(&self.redis, &self.redis_base, v)));
            self.counts.set_both(at(cp.active), cp.building.map(at));
        }
        Ok(())
    }

    /// Refreshes every second until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "cannot read the projection version pointers");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
