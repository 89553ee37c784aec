//! The `Collections` service (exists, create, get, list, delete; one qdrant-edge shard per
//! collection, in a directory of its own) and the `Qdrant` health check, which names this server
//! for what it is. Every other RPC is `Unimplemented`. Must not: accept a collection setting it
//! does not apply.

use crate::convert::{refuse_set, unsupported};
use crate::{blocking, Collection, State, TITLE};
use qdrant_client::qdrant as pb;
use qdrant_client::qdrant::collections_server::Collections;
use qdrant_client::qdrant::qdrant_server::Qdrant;
use qdrant_edge::{
    Distance, EdgeConfig, EdgeConfigBuilder, EdgeShard, EdgeSparseVectorParamsBuilder, EdgeVectorParamsBuilder,
    Modifier, PayloadSchemaType,
};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tonic::{Request, Response, Status};

pub(crate) struct Health;

#[tonic::async_trait]
impl Qdrant for Health {
    async fn health_check(&self, _: Request<pb::HealthCheckRequest>) -> Result<Response<pb::HealthCheckReply>, Status> {
        // `version` is qdrant-edge's, the engine underneath; the title says this is not Qdrant.
        Ok(Response::new(pb::HealthCheckReply { title: TITLE.into(), version: "0.7.2".into(), commit: None }))
    }
}

pub(crate) struct Service(pub Arc<State>);

fn distance(d: i32) -> Result<Distance, Status> {
    match pb::Distance::try_from(d) {
        Ok(pb::Distance::Cosine) => Ok(Distance::Cosine),
        Ok(pb::Distance::Dot) => Ok(Distance::Dot),
        Ok(pb::Distance::Euclid) => Ok(Distance::Euclid),
        Ok(pb::Distance::Manhattan) => Ok(Distance::Manhattan),
        _ => Err(Status::invalid_argument(format!("unknown distance {d}"))),
    }
}

fn proto_distance(d: Distance) -> pb::Distance {
    match d {
        Distance::Cosine => pb::Distance::Cosine,
        Distance::Dot => pb::Distance::Dot,
        Distance::Euclid => pb::Distance::Euclid,
        Distance::Manhattan => pb::Distance::Manhattan,
    }
}

/// The shard config for a create request: one unnamed dense vector and named sparse vectors.
#[allow(deprecated)]
fn config(r: &pb::CreateCollection) -> Result<EdgeConfig, Status> {
    refuse_set!(r; hnsw_config, wal_config, optimizers_config, shard_number, on_disk_payload, timeout);
    refuse_set!(r; replication_factor, write_consistency_factor, quantization_config, sharding_method);
    refuse_set!(r; strict_mode_config, payload, id_tracker);
    if !r.metadata.is_empty() {
        return Err(unsupported("metadata"));
    }
    let dense = match r.vectors_config.as_ref().and_then(|v| v.config.as_ref()) {
        Some(pb::vectors_config::Config::Params(p)) => p,
        Some(pb::vectors_config::Config::ParamsMap(_)) => return Err(unsupported("named dense vectors")),
        None => return Err(unsupported("collections without a dense vector")),
    };
    refuse_set!(dense; hnsw_config, quantization_config, on_disk, datatype, multivector_config, memory);
    let dim = usize::try_from(dense.size).map_err(|_| Status::invalid_argument("vector size"))?;
    let mut builder =
        EdgeConfigBuilder::new().vector("", EdgeVectorParamsBuilder::new(dim, distance(dense.distance)?).build());
    for (name, params) in r.sparse_vectors_config.iter().flat_map(|s| &s.map) {
        refuse_set!(params; index);
        let mut sparse = EdgeSparseVectorParamsBuilder::new();
        match params.modifier.map(pb::Modifier::try_from) {
            None | Some(Ok(pb::Modifier::None)) => {}
            Some(Ok(pb::Modifier::Idf)) => sparse = sparse.modifier(Modifier::Idf),
            Some(Err(_)) => return Err(Status::invalid_argument("unknown sparse modifier")),
        }
        builder = builder.sparse_vector(name.clone(), sparse.build());
    }
    Ok(builder.build())
}

fn proto_schema_type(t: PayloadSchemaType) -> pb::PayloadSchemaType {
    match t {
        PayloadSchemaType::Keyword => pb::PayloadSchemaType::Keyword,
        PayloadSchemaType::Integer => pb::PayloadSchemaType::Integer,
        PayloadSchemaType::Float => pb::PayloadSchemaType::Float,
        PayloadSchemaType::Bool => pb::PayloadSchemaType::Bool,
        PayloadSchemaType::Geo => pb::PayloadSchemaType::Geo,
        PayloadSchemaType::Text => pb::PayloadSchemaType::Text,
        PayloadSchemaType::Datetime => pb::PayloadSchemaType::Datetime,
        PayloadSchemaType::Uuid => pb::PayloadSchemaType::Uuid,
    }
}

/// The collection's info as Qdrant reports it: vectors config, sparse vectors, payload indexes.
fn info(c: &Collection) -> Result<pb::CollectionInfo, Status> {
    let shard = c.shard.read().map_err(|_| Status::internal("shard lock poisoned"))?;
    let (config, stats) = (shard.config(), shard.info());
    let dense = config.vectors.get("").ok_or_else(|| Status::internal("collection has no unnamed vector"))?;
    let params = pb::VectorParams {
        size: dense.size as u64,
        distance: proto_distance(dense.distance) as i32,
        ..Default::default()
    };
    let sparse = config
        .sparse_vectors
        .iter()
        .map(|(name, p)| {
            let modifier = p.modifier.map(|m| match m {
                Modifier::Idf => pb::Modifier::Idf as i32,
                _ => pb::Modifier::None as i32,
            });
            (name.clone(), pb::SparseVectorParams { index: None, modifier })
        })
        .collect();
    let payload_schema = stats
        .payload_schema
        .iter()
        .map(|(key, i)| {
            let info = pb::PayloadSchemaInfo {
                data_type: proto_schema_type(i.data_type) as i32,
                params: None,
                points: Some(i.points as u64),
            };
            (key.to_string(), info)
        })
        .collect();
    let collection_params = pb::CollectionParams {
        shard_number: 1,
        vectors_config: Some(pb::VectorsConfig { config: Some(pb::vectors_config::Config::Params(params)) }),
        sparse_vectors_config: Some(pb::SparseVectorConfig { map: sparse }),
        ..Default::default()
    };
    Ok(pb::CollectionInfo {
        status: pb::CollectionStatus::Green as i32,
        segments_count: stats.segments_count as u64,
        config: Some(pb::CollectionConfig { params: Some(collection_params), ..Default::default() }),
        payload_schema,
        points_count: Some(stats.points_count as u64),
        indexed_vectors_count: Some(stats.indexed_vectors_count as u64),
        ..Default::default()
    })
}

fn ok(started: Instant, result: bool) -> Response<pb::CollectionOperationResponse> {
    Response::new(pb::CollectionOperationResponse { result, time: started.elapsed().as_secs_f64() })
}

#[tonic::async_trait]
impl Collections for Service {
    async fn collection_exists(
        &self,
        req: Request<pb::CollectionExistsRequest>,
    ) -> Result<Response<pb::CollectionExistsResponse>, Status> {
        let started = Instant::now();
        let exists = self.0.collection(&req.into_inner().collection_name).is_ok();
        let result = Some(pb::CollectionExists { exists });
        Ok(Response::new(pb::CollectionExistsResponse { result, time: started.elapsed().as_secs_f64() }))
    }

    async fn create(
        &self,
        req: Request<pb::CreateCollection>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        let config = config(&r)?;
        let name = r.collection_name;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(Status::invalid_argument(format!("collection name `{name}`: letters, digits, `_`, `-`")));
        }
        let state = self.0.clone();
        blocking(move || {
            // Held across the shard's creation so two creators cannot both make it.
            let mut map = state.collections.write().map_err(|_| Status::internal("collections lock poisoned"))?;
            if map.contains_key(&name) {
                return Err(Status::already_exists(format!("Collection `{name}` already exists!")));
            }
            let dir = state.dir.join(&name);
            std::fs::create_dir_all(&dir).map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
            let shard = EdgeShard::new(&dir, config).map_err(crate::convert::engine_error("create shard"))?;
            map.insert(name, Arc::new(Collection { shard: RwLock::new(shard) }));
            Ok(())
        })
        .await?;
        Ok(ok(started, true))
    }

    async fn get(
        &self,
        req: Request<pb::GetCollectionInfoRequest>,
    ) -> Result<Response<pb::GetCollectionInfoResponse>, Status> {
        let started = Instant::now();
        let c = self.0.collection(&req.into_inner().collection_name)?;
        let info = blocking(move || info(&c)).await?;
        Ok(Response::new(pb::GetCollectionInfoResponse { result: Some(info), time: started.elapsed().as_secs_f64() }))
    }

    async fn list(
        &self,
        _: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let started = Instant::now();
        let map = self.0.collections.read().map_err(|_| Status::internal("collections lock poisoned"))?;
        let collections = map.keys().map(|name| pb::CollectionDescription { name: name.clone() }).collect();
        Ok(Response::new(pb::ListCollectionsResponse { collections, time: started.elapsed().as_secs_f64() }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteCollection>,
    ) -> Result<Response<pb::CollectionOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        refuse_set!(r; timeout);
        let state = self.0.clone();
        let existed = blocking(move || {
            let removed = {
                let mut map = state.collections.write().map_err(|_| Status::internal("collections lock poisoned"))?;
                map.remove(&r.collection_name)
            };
            let existed = removed.is_some();
            // The shard flushes on drop, so its files go only after its last user: now, or (a
            // request still holds it) with the server's directory when the server stops.
            if let Some(Ok(shard)) = removed.map(Arc::try_unwrap) {
                drop(shard);
                let dir = state.dir.join(&r.collection_name);
                std::fs::remove_dir_all(&dir).map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
            }
            Ok(existed)
        })
        .await?;
        Ok(ok(started, existed))
    }

    unimplemented_rpcs! {
        update(UpdateCollection) -> CollectionOperationResponse;
        update_aliases(ChangeAliases) -> CollectionOperationResponse;
        list_collection_aliases(ListCollectionAliasesRequest) -> ListAliasesResponse;
        list_aliases(ListAliasesRequest) -> ListAliasesResponse;
        collection_cluster_info(CollectionClusterInfoRequest) -> CollectionClusterInfoResponse;
        update_collection_cluster_setup(UpdateCollectionClusterSetupRequest) -> UpdateCollectionClusterSetupResponse;
        create_shard_key(CreateShardKeyRequest) -> CreateShardKeyResponse;
        delete_shard_key(DeleteShardKeyRequest) -> DeleteShardKeyResponse;
        list_shard_keys(ListShardKeysRequest) -> ListShardKeysResponse;
    }
}
