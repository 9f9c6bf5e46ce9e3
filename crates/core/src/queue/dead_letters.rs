//! Dead letters: list (paged), redrive to the queue, purge.

use agentmesh_proto::v1::{
    DeadLetter, DeliveryAttempt, ListDeadLettersRequest, ListDeadLettersResponse,
    PurgeDeadLettersRequest, PurgeDeadLettersResponse, RedriveDeadLettersRequest,
    RedriveDeadLettersResponse,
};
use agentmesh_queue::Selection;
use tonic::Status;

use super::{Queues, decode_envelope, queue_error_status, timestamp};

impl Queues {
    pub(super) async fn list_dead(
        &self,
        request: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, Status> {
        let page_size = match request.page_size {
            0 => 100,
            n => n as usize,
        };
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let (dead, next) = self
            .backend
            .list_dead_letters(&request.queue, page_size, after)
            .await
            .map_err(queue_error_status)?;
        Ok(ListDeadLettersResponse {
            dead_letters: dead
                .into_iter()
                .map(|d| DeadLetter {
                    envelope: Some(decode_envelope(&d.body, &d.message_id)),
                    message_id: d.message_id,
                    queue: request.queue.clone(),
                    last_error: d.last_error,
                    attempts: d
                        .attempts
                        .into_iter()
                        .map(|a| DeliveryAttempt {
                            attempt: a.attempt,
                            delivered_at: Some(timestamp(a.delivered_at)),
                            consumer_id: a.consumer_id,
                            error: a.error,
                        })
                        .collect(),
                    dead_lettered_at: Some(timestamp(d.dead_lettered_at)),
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }

    fn selection(ids: Vec<String>, all: bool) -> Result<Selection, Status> {
        if all {
            Ok(Selection::All)
        } else if ids.is_empty() {
            Err(Status::invalid_argument(
                "say which dead letters: set all, or list message_ids",
            ))
        } else {
            Ok(Selection::Ids(ids))
        }
    }

    pub(super) async fn redrive(
        &self,
        request: RedriveDeadLettersRequest,
    ) -> Result<RedriveDeadLettersResponse, Status> {
        let selection = Self::selection(request.message_ids, request.all)?;
        let redriven = self
            .backend
            .redrive(&request.queue, selection)
            .await
            .map_err(queue_error_status)?;
        Ok(RedriveDeadLettersResponse { redriven })
    }

    pub(super) async fn purge(
        &self,
        request: PurgeDeadLettersRequest,
    ) -> Result<PurgeDeadLettersResponse, Status> {
        let selection = Self::selection(request.message_ids, request.all)?;
        let purged = self
            .backend
            .purge(&request.queue, selection)
            .await
            .map_err(queue_error_status)?;
        Ok(PurgeDeadLettersResponse { purged })
    }
}
