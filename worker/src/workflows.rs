//! The store's workflows, as DESIGN.md describes them.

use std::time::Duration;

use engine::{Workflow, WorkflowContext, WorkflowError, WorkflowKind, set_events_in};
use serde_json::{Value, json};
use store::{
    self, CHECKOUT, CheckoutInput, DISPATCH, DISPATCH_STEPS, DispatchInput, PaymentStatus,
    dispatch_workflow_id, topics,
};

/// Checkout: reserve a unit, create the order, hand out the payment id,
/// wait for the payment, then mark paid (and start dispatch) or cancel.
pub struct Checkout {
    /// How long to wait for the webhook before cancelling.
    pub payment_timeout: Duration,
}

impl Workflow for Checkout {
    type Input = CheckoutInput;
    type Output = Value;

    fn kind(&self) -> WorkflowKind {
        CHECKOUT
    }

    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: CheckoutInput,
    ) -> Result<Value, WorkflowError> {
        let checkout_id = ctx.workflow_id().to_owned();
        let product_id = if input.product_id == 0 {
            store::WIDGET_ID
        } else {
            input.product_id
        };

        // A statement of its own (the claim before it has committed), so
        // every checkout's lock on the product row lasts only while that
        // statement runs.
        let reserved: Option<bool> = ctx
            .sql_step("reserve_inventory", store::reserve_inventory(product_id))
            .await?;
        if reserved != Some(true) {
            // No unit: the API answers "out of stock" (409).
            ctx.set_event(topics::PAYMENT_ID, Value::Null).await?;
            return Ok(json!({ "outcome": "out_of_stock" }));
        }

        // The payment id (it is the checkout id) goes out with the order:
        // one statement, committed on its own, so the shopper has it
        // without waiting for the recv below to park.
        let order_id: i64 = ctx
            .sql_step(
                "create_order",
                store::create_order(product_id, &checkout_id)
                    .event(topics::PAYMENT_ID, &checkout_id),
            )
            .await?;

        let payment = ctx
            .recv(topics::PAYMENT_STATUS, self.payment_timeout)
            .await?
            .and_then(|value| serde_json::from_value::<PaymentStatus>(value).ok());
        let outcome = match payment {
            Some(PaymentStatus::Paid) => "paid",
            Some(PaymentStatus::Failed) => "failed",
            None => "timed_out",
        };

        let output = json!({ "order_id": order_id, "payment": outcome });
        if payment == Some(PaymentStatus::Paid) {
            // The order paid, its dispatch started, the webhook's answer
            // published and the checkout ended: one statement, its own
            // commit.
            let statement = store::mark_paid(order_id)
                .start(
                    DISPATCH,
                    &dispatch_workflow_id(order_id),
                    &DispatchInput { order_id },
                )
                .event(topics::PAYMENT_OUTCOME, outcome)
                .event(topics::ORDER_ID, order_id);
            return ctx.final_sql_step("mark_paid", statement, output).await;
        }
        // The unit goes back to the product row, every checkout's lock:
        // a statement of its own (nothing is open after the recv), so
        // it holds that row only while it runs.
        let _: Option<bool> = ctx
            .sql_step("cancel_order", store::cancel_order(order_id))
            .await?;
        ctx.tx_step("publish_cancellation", |tx| {
            let checkout_id = checkout_id.clone();
            Box::pin(
                async move { Ok(publish_settlement(tx, &checkout_id, outcome, order_id).await?) },
            )
        })
        .await?;
        Ok(output)
    }
}

/// The events that answer a cancelled checkout's payment webhook: how the
/// payment was settled, and the order (a paid one's ride in `mark_paid`).
async fn publish_settlement(
    tx: &mut sqlx::PgConnection,
    checkout_id: &str,
    outcome: &str,
    order_id: i64,
) -> Result<(), sqlx::Error> {
    let events = [
        (topics::PAYMENT_OUTCOME, &json!(outcome)),
        (topics::ORDER_ID, &json!(order_id)),
    ];
    set_events_in(tx, checkout_id, &events).await
}

/// Dispatch of a paid order: ten times { durable sleep; one progress step },
/// the last of which ends the workflow.
pub struct Dispatch {
    /// Pause before each progress step.
    pub interval: Duration,
}

impl Workflow for Dispatch {
    type Input = DispatchInput;
    type Output = Value;

    fn kind(&self) -> WorkflowKind {
        DISPATCH
    }

    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: DispatchInput,
    ) -> Result<Value, WorkflowError> {
        let order_id = input.order_id;
        for _ in 1..DISPATCH_STEPS {
            ctx.sleep(self.interval).await?;
            let _: Option<i32> = ctx
                .sql_step("update_progress", store::update_progress(order_id))
                .await?;
        }
        ctx.sleep(self.interval).await?;
        let output = json!({ "order_id": order_id });
        ctx.final_sql_step("update_progress", store::update_progress(order_id), output)
            .await
    }
}
