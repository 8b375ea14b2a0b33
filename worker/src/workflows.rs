//! The store's workflows, as DESIGN.md describes them.

use std::time::Duration;

use serde_json::{Value, json};
use shared::engine::{
    Engine, StepError, Workflow, WorkflowContext, WorkflowError, WorkflowKind, set_events_in,
};
use shared::store::{
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

        let reserved: bool = ctx
            .tx_step("reserve_inventory", |tx| {
                let checkout_id = checkout_id.clone();
                Box::pin(async move {
                    let reserved = store::reserve_inventory(tx, product_id).await?;
                    if !reserved {
                        // No unit: the API answers "out of stock" (409).
                        set_events_in(tx, &checkout_id, &[(topics::PAYMENT_ID, &Value::Null)])
                            .await?;
                    }
                    Ok(reserved)
                })
            })
            .await?;
        if !reserved {
            return Ok(json!({ "outcome": "out_of_stock" }));
        }
        // Every checkout locks the product's row: release it now rather
        // than with the order and the payment wait.
        ctx.commit().await?;

        let order_id: i64 = ctx
            .tx_step("create_order", |tx| {
                let checkout_id = checkout_id.clone();
                Box::pin(async move {
                    let order_id = store::create_order(tx, product_id, &checkout_id).await?;
                    // The payment id is the checkout id.
                    set_events_in(
                        tx,
                        &checkout_id,
                        &[(topics::PAYMENT_ID, &json!(checkout_id))],
                    )
                    .await?;
                    Ok(order_id)
                })
            })
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

        let settle = if payment == Some(PaymentStatus::Paid) {
            "mark_paid"
        } else {
            "cancel_order"
        };
        ctx.tx_step(settle, |tx| {
            let checkout_id = checkout_id.clone();
            Box::pin(async move {
                if payment == Some(PaymentStatus::Paid) {
                    store::mark_paid(tx, order_id).await?;
                    Engine::start_in(
                        tx,
                        DISPATCH,
                        &dispatch_workflow_id(order_id),
                        &DispatchInput { order_id },
                    )
                    .await
                    .map_err(|e| StepError::Retryable(e.into()))?;
                } else {
                    store::cancel_order(tx, order_id).await?;
                }
                let events = [
                    (topics::PAYMENT_OUTCOME, &json!(outcome)),
                    (topics::ORDER_ID, &json!(order_id)),
                ];
                set_events_in(tx, &checkout_id, &events).await?;
                Ok(())
            })
        })
        .await?;
        Ok(json!({ "order_id": order_id, "payment": outcome }))
    }
}

/// Dispatch of a paid order: ten times { durable sleep; one progress step }.
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
        let mut left = DISPATCH_STEPS;
        for _ in 0..DISPATCH_STEPS {
            ctx.sleep(self.interval).await?;
            left = ctx
                .tx_step("update_progress", |tx| {
                    Box::pin(async move { Ok(store::update_progress(tx, order_id).await?) })
                })
                .await?;
        }
        Ok(json!({ "order_id": order_id, "progress_remaining": left }))
    }
}
