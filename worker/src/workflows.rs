//! The store's workflows, as DESIGN.md describes them.

use std::time::Duration;

use engine::{Ending, Workflow, WorkflowContext, WorkflowError, WorkflowKind};
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

    fn request_id<'i>(&self, input: &'i CheckoutInput) -> Option<&'i str> {
        input.request_id.as_deref()
    }

    async fn run(
        &self,
        ctx: &mut WorkflowContext,
        input: CheckoutInput,
    ) -> Result<Value, WorkflowError> {
        let checkout_id = ctx.workflow_id().to_owned();
        let product_id = input.product();

        let reserved: Option<bool> = ctx
            .db_step("reserve_inventory", store::reserve_inventory(product_id))
            .await?;
        if reserved != Some(true) {
            // No unit: the API answers "out of stock" (409).
            ctx.set_event(topics::PAYMENT_ID, Value::Null).await?;
            return Ok(json!({ "outcome": "out_of_stock" }));
        }

        let order_id: i64 = ctx
            .db_step(
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
            let dispatch = DispatchInput { order_id };
            let paid = store::mark_paid(order_id)
                .start(DISPATCH, &dispatch_workflow_id(order_id), &dispatch)
                .event(topics::PAYMENT_OUTCOME, outcome)
                .event(topics::ORDER_ID, order_id)
                .ends_workflow(output);
            return ctx.db_step("mark_paid", paid).await;
        }
        let cancelled = store::cancel_order(order_id)
            .event(topics::PAYMENT_OUTCOME, outcome)
            .event(topics::ORDER_ID, order_id)
            .ends_workflow(output);
        ctx.db_step("cancel_order", cancelled).await
    }

    /// Cancelled by an operator, or failed for good: the order is
    /// cancelled and its unit returned (a payment that came for it is a
    /// refund due), or, cancelled before its order existed, the reserved
    /// unit goes back to stock.
    async fn compensate(
        &self,
        ctx: &mut WorkflowContext,
        input: CheckoutInput,
        ending: &Ending,
    ) -> Result<(), WorkflowError> {
        let outcome = if ending.is_cancelled() {
            "cancelled"
        } else {
            "failed"
        };
        if let Some(order_id) = ending.output::<i64>("create_order")? {
            let cancelled = store::cancel_order(order_id)
                .event(topics::PAYMENT_OUTCOME, outcome)
                .event(topics::ORDER_ID, order_id);
            let _: Option<bool> = ctx.db_step("cancel_order", cancelled).await?;
        } else if ending.output::<Option<bool>>("reserve_inventory")? == Some(Some(true)) {
            // The checkout request waiting for a payment id hears why none comes.
            let released = store::release_unit(input.product())
                .event(topics::PAYMENT_ID, json!({ "ended": outcome }));
            let _: Option<bool> = ctx.db_step("release_unit", released).await?;
        }
        Ok(())
    }
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
                .db_step("update_progress", store::update_progress(order_id))
                .await?;
        }
        ctx.sleep(self.interval).await?;
        let dispatched =
            store::update_progress(order_id).ends_workflow(json!({ "order_id": order_id }));
        ctx.db_step("update_progress", dispatched).await
    }
}
