//! Results: what an ack stored by correlation id, read at once, waited for until the call's
//! deadline, or streamed (keep-alive events, then the result).

use std::time::Duration;

use agentmesh_proto::{
    CallContext, ERROR_DOMAIN,
    v1::{AwaitResultRequest, AwaitResultResponse, Envelope, GetResultRequest, GetResultResponse},
};
use agentmesh_queue::QueueError;
use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::{Queues, queue_error_status};

impl Queues {
    pub(super) async fn result(
        &self,
        call: CallContext,
        request: GetResultRequest,
    ) -> Result<GetResultResponse, Status> {
        let correlation_id = request.correlation_id;
        if correlation_id.is_empty() {
            return Err(Status::invalid_argument("correlation_id is required"));
        }
        let found = if request.wait {
            // Answer just before the caller's deadline, so it gets NOT_FOUND, not a timeout.
            let remaining = call.deadline.remaining();
            let budget = remaining.saturating_sub((remaining / 20).min(Duration::from_millis(50)));
            tokio::select! {
                found = self.backend.wait_result(&correlation_id, budget) => found,
                _ = self.shutdown.cancelled() => Err(QueueError::Closed),
            }
        } else {
            self.backend.get_result(&correlation_id).await
        }
        .map_err(queue_error_status)?;
        match found {
            Some(body) => Ok(GetResultResponse {
                result: Some(decode_result(&body)?),
            }),
            None => Err(Status::with_error_details(
                Code::NotFound,
                format!("no result for correlation id {correlation_id} (yet)"),
                ErrorDetails::with_error_info(
                    "RESULT_NOT_FOUND",
                    ERROR_DOMAIN,
                    [("correlation_id".to_owned(), correlation_id.clone())],
                ),
            )),
        }
    }

    pub(super) fn result_events(
        &self,
        call: CallContext,
        request: AwaitResultRequest,
    ) -> Result<mpsc::Receiver<Result<AwaitResultResponse, Status>>, Status> {
        let correlation_id = request.correlation_id;
        if correlation_id.is_empty() {
            return Err(Status::invalid_argument("correlation_id is required"));
        }
        let (tx, rx) = mpsc::channel(2);
        let backend = self.backend.clone();
        let shutdown = self.shutdown.clone();
        let keep_alive = self.keep_alive;
        // Without a deadline from the caller the stream waits as long as the caller stays.
        let deadline = call.deadline.explicit.then_some(call.deadline);
        tokio::spawn(async move {
            loop {
                let wait = match deadline {
                    Some(d) if d.remaining().is_zero() => {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no result for correlation id {correlation_id} before the deadline"
                            ))))
                            .await;
                        return;
                    }
                    Some(d) => keep_alive.min(d.remaining()),
                    None => keep_alive,
                };
                let found = tokio::select! {
                    found = backend.wait_result(&correlation_id, wait) => found,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => Err(QueueError::Closed),
                };
                let event = match found {
                    Ok(Some(body)) => match decode_result(&body) {
                        Ok(result) => {
                            let _ = tx
                                .send(Ok(AwaitResultResponse {
                                    result: Some(result),
                                }))
                                .await;
                            return;
                        }
                        Err(status) => Err(status),
                    },
                    Ok(None) => Ok(AwaitResultResponse { result: None }),
                    Err(e) => Err(queue_error_status(e)),
                };
                let last = event.is_err();
                if tx.send(event).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn decode_result(body: &Bytes) -> Result<Envelope, Status> {
    Envelope::decode(body.clone())
        .map_err(|e| Status::data_loss(format!("the stored result is not an Envelope: {e}")))
}
