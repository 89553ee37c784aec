//! The `Points` service over a collection's qdrant-edge shard: upsert, delete (ids or filter),
//! get, overwrite_payload, create_field_index, scroll and query (nearest, dense or sparse). Each
//! write is applied and flushed before it is acknowledged. Every other RPC is `Unimplemented`.
//! Must not: accept a request field it does not honour.

use crate::convert::{self, refuse_set, require_wait, unsupported};
use crate::{blocking, Collection, State};
use qdrant_client::qdrant as pb;
use qdrant_client::qdrant::points_server::Points;
use qdrant_edge::{
    CreateIndex, FieldIndexOperations, NamedQuery, PayloadFieldSchema, PayloadOps, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, QueryEnum, ScrollRequest, SearchRequest, SetPayloadOp,
    UpdateOperation, Vector, VectorInternal, Vectors,
};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub(crate) struct Service(pub Arc<State>);

/// Applies one operation and flushes the shard before answering (the write is durable).
fn write(c: &Collection, op: UpdateOperation) -> Result<(), Status> {
    let shard = c.shard.write().map_err(|_| Status::internal("shard lock poisoned"))?;
    shard.update(op).map_err(convert::engine_error("update"))?;
    shard.flush();
    Ok(())
}

fn done(started: Instant) -> Response<pb::PointsOperationResponse> {
    let result = pb::UpdateResult { operation_id: None, status: pb::UpdateStatus::Completed as i32 };
    Response::new(pb::PointsOperationResponse {
        result: Some(result),
        time: started.elapsed().as_secs_f64(),
        usage: None,
    })
}

fn ids(list: pb::PointsIdsList) -> Result<Vec<PointId>, Status> {
    list.ids.into_iter().map(|id| convert::point_id(Some(id))).collect()
}

/// One point, its vectors checked against the collection (dense size, known sparse names).
fn point(c: &Collection, p: pb::PointStruct) -> Result<qdrant_edge::PointStructPersisted, Status> {
    let id = convert::point_id(p.id)?;
    let vectors: HashMap<String, Vector> = convert::vectors(p.vectors)?;
    let shard = c.shard.read().map_err(|_| Status::internal("shard lock poisoned"))?;
    let config = shard.config();
    for (name, v) in &vectors {
        match (&v.0, config.vectors.get(name), config.sparse_vectors.contains_key(name)) {
            (VectorInternal::Dense(d), Some(params), _) if d.len() == params.size => {}
            (VectorInternal::Dense(d), Some(params), _) => {
                return Err(Status::invalid_argument(format!(
                    "Wrong input: Vector dimension error: expected dim: {}, got {}",
                    params.size,
                    d.len()
                )))
            }
            (VectorInternal::Sparse(_), None, true) => {}
            _ => return Err(Status::invalid_argument(format!("Wrong input: Not existing vector name: `{name}`"))),
        }
    }
    Ok(PointStruct::new(id, Vectors::from(vectors), Value::Object(convert::payload_in(p.payload))).into())
}

#[tonic::async_trait]
impl Points for Service {
    async fn upsert(&self, req: Request<pb::UpsertPoints>) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        require_wait(r.wait)?;
        refuse_set!(r; ordering, shard_key_selector, update_filter, timeout, update_mode);
        let c = self.0.collection(&r.collection_name)?;
        blocking(move || {
            let points = r.points.into_iter().map(|p| point(&c, p)).collect::<Result<Vec<_>, _>>()?;
            let op = PointOperations::UpsertPoints(PointInsertOperations::PointsList(points));
            write(&c, UpdateOperation::PointOperation(op))
        })
        .await?;
        Ok(done(started))
    }

    async fn delete(&self, req: Request<pb::DeletePoints>) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        require_wait(r.wait)?;
        refuse_set!(r; ordering, shard_key_selector, timeout);
        let c = self.0.collection(&r.collection_name)?;
        let op = match r.points.and_then(|p| p.points_selector_one_of) {
            Some(pb::points_selector::PointsSelectorOneOf::Points(list)) => {
                PointOperations::DeletePoints { ids: ids(list)? }
            }
            Some(pb::points_selector::PointsSelectorOneOf::Filter(f)) => {
                PointOperations::DeletePointsByFilter(convert::filter(Some(f))?.unwrap_or_default())
            }
            None => return Err(Status::invalid_argument("no points selector")),
        };
        blocking(move || write(&c, UpdateOperation::PointOperation(op))).await?;
        Ok(done(started))
    }

    async fn get(&self, req: Request<pb::GetPoints>) -> Result<Response<pb::GetResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        refuse_set!(r; read_consistency, shard_key_selector, timeout);
        convert::refuse_with_vectors(&r.with_vectors)?;
        let c = self.0.collection(&r.collection_name)?;
        let ids = ids(pb::PointsIdsList { ids: r.ids })?;
        let with_payload = convert::payload_interface(r.with_payload)?;
        let records = blocking(move || {
            let shard = c.shard.read().map_err(|_| Status::internal("shard lock poisoned"))?;
            shard.retrieve(&ids, Some(with_payload), None).map_err(convert::engine_error("retrieve"))
        })
        .await?;
        let result = records.into_iter().map(|r| convert::retrieved(r.id, r.payload)).collect();
        Ok(Response::new(pb::GetResponse { result, time: started.elapsed().as_secs_f64(), usage: None }))
    }

    async fn overwrite_payload(
        &self,
        req: Request<pb::SetPayloadPoints>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        require_wait(r.wait)?;
        refuse_set!(r; ordering, shard_key_selector, key, timeout);
        let c = self.0.collection(&r.collection_name)?;
        let (points, filter) = match r.points_selector.and_then(|p| p.points_selector_one_of) {
            Some(pb::points_selector::PointsSelectorOneOf::Points(list)) => (Some(ids(list)?), None),
            Some(pb::points_selector::PointsSelectorOneOf::Filter(f)) => (None, convert::filter(Some(f))?),
            None => return Err(Status::invalid_argument("no points selector")),
        };
        let payload = qdrant_edge::Payload(convert::payload_in(r.payload));
        let op = SetPayloadOp { payload, points, filter, key: None };
        blocking(move || write(&c, UpdateOperation::PayloadOperation(PayloadOps::OverwritePayload(op)))).await?;
        Ok(done(started))
    }

    async fn create_field_index(
        &self,
        req: Request<pb::CreateFieldIndexCollection>,
    ) -> Result<Response<pb::PointsOperationResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        require_wait(r.wait)?;
        refuse_set!(r; field_index_params, ordering, timeout);
        let ty = match r.field_type.map(pb::FieldType::try_from) {
            Some(Ok(pb::FieldType::Keyword)) => PayloadSchemaType::Keyword,
            Some(Ok(pb::FieldType::Integer)) => PayloadSchemaType::Integer,
            Some(Ok(pb::FieldType::Float)) => PayloadSchemaType::Float,
            Some(Ok(pb::FieldType::Bool)) => PayloadSchemaType::Bool,
            _ => return Err(unsupported("field types other than keyword, integer, float and bool")),
        };
        let field_name = r.field_name.parse().map_err(|_| Status::invalid_argument("bad field name"))?;
        let c = self.0.collection(&r.collection_name)?;
        let op = FieldIndexOperations::CreateIndex(CreateIndex {
            field_name,
            field_schema: Some(PayloadFieldSchema::FieldType(ty)),
        });
        blocking(move || write(&c, UpdateOperation::FieldIndexOperation(op))).await?;
        Ok(done(started))
    }

    async fn scroll(&self, req: Request<pb::ScrollPoints>) -> Result<Response<pb::ScrollResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        refuse_set!(r; read_consistency, shard_key_selector, order_by, timeout);
        convert::refuse_with_vectors(&r.with_vectors)?;
        let c = self.0.collection(&r.collection_name)?;
        let request = ScrollRequest {
            offset: r.offset.map(|id| convert::point_id(Some(id))).transpose()?,
            limit: Some(r.limit.unwrap_or(10) as usize),
            filter: convert::filter(r.filter)?,
            with_payload: Some(convert::payload_interface(r.with_payload)?),
            ..Default::default()
        };
        let (records, next) = blocking(move || {
            let shard = c.shard.read().map_err(|_| Status::internal("shard lock poisoned"))?;
            shard.scroll(request).map_err(convert::engine_error("scroll"))
        })
        .await?;
        Ok(Response::new(pb::ScrollResponse {
            next_page_offset: next.map(convert::proto_id),
            result: records.into_iter().map(|r| convert::retrieved(r.id, r.payload)).collect(),
            time: started.elapsed().as_secs_f64(),
            usage: None,
        }))
    }

    async fn query(&self, req: Request<pb::QueryPoints>) -> Result<Response<pb::QueryResponse>, Status> {
        let (started, r) = (Instant::now(), req.into_inner());
        refuse_set!(r; params, read_consistency, shard_key_selector, lookup_from, timeout);
        if !r.prefetch.is_empty() {
            return Err(unsupported("prefetch"));
        }
        convert::refuse_with_vectors(&r.with_vectors)?;
        let input = match r.query.and_then(|q| q.variant) {
            Some(pb::query::Variant::Nearest(v)) => v.variant,
            Some(_) => return Err(unsupported("queries other than nearest")),
            None => return Err(unsupported("a query without `query` (scroll-like)")),
        };
        let vector = match input {
            Some(pb::vector_input::Variant::Dense(d)) => VectorInternal::Dense(d.data),
            Some(pb::vector_input::Variant::Sparse(s)) => VectorInternal::Sparse(convert::sparse(s.indices, s.values)?),
            _ => return Err(unsupported("nearest inputs other than dense and sparse vectors")),
        };
        let c = self.0.collection(&r.collection_name)?;
        let request = SearchRequest {
            query: QueryEnum::Nearest(NamedQuery { query: vector, using: r.using.filter(|u| !u.is_empty()) }),
            filter: convert::filter(r.filter)?,
            params: None,
            limit: r.limit.unwrap_or(10) as usize,
            offset: r.offset.unwrap_or(0) as usize,
            with_payload: Some(convert::payload_interface(r.with_payload)?),
            with_vector: None,
            score_threshold: r.score_threshold,
        };
        let points = blocking(move || {
            let shard = c.shard.read().map_err(|_| Status::internal("shard lock poisoned"))?;
            shard.search(request).map_err(convert::engine_error("search"))
        })
        .await?;
        let result = points.into_iter().map(convert::scored).collect();
        Ok(Response::new(pb::QueryResponse { result, time: started.elapsed().as_secs_f64(), usage: None }))
    }

    unimplemented_rpcs! {
        update_vectors(UpdatePointVectors) -> PointsOperationResponse;
        delete_vectors(DeletePointVectors) -> PointsOperationResponse;
        set_payload(SetPayloadPoints) -> PointsOperationResponse;
        delete_payload(DeletePayloadPoints) -> PointsOperationResponse;
        clear_payload(ClearPayloadPoints) -> PointsOperationResponse;
        delete_field_index(DeleteFieldIndexCollection) -> PointsOperationResponse;
        create_vector_name(CreateVectorNameRequest) -> PointsOperationResponse;
        delete_vector_name(DeleteVectorNameRequest) -> PointsOperationResponse;
        search(SearchPoints) -> SearchResponse;
        search_batch(SearchBatchPoints) -> SearchBatchResponse;
        search_groups(SearchPointGroups) -> SearchGroupsResponse;
        recommend(RecommendPoints) -> RecommendResponse;
        recommend_batch(RecommendBatchPoints) -> RecommendBatchResponse;
        recommend_groups(RecommendPointGroups) -> RecommendGroupsResponse;
        discover(DiscoverPoints) -> DiscoverResponse;
        discover_batch(DiscoverBatchPoints) -> DiscoverBatchResponse;
        count(CountPoints) -> CountResponse;
        update_batch(UpdateBatchPoints) -> UpdateBatchResponse;
        query_batch(QueryBatchPoints) -> QueryBatchResponse;
        query_groups(QueryPointGroups) -> QueryGroupsResponse;
        facet(FacetCounts) -> FacetResponse;
        search_matrix_pairs(SearchMatrixPoints) -> SearchMatrixPairsResponse;
        search_matrix_offsets(SearchMatrixPoints) -> SearchMatrixOffsetsResponse;
    }
}
