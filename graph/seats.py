"""An organisation's seats, for the host app's backend: thin resolvers over `billing.seats`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from billing import seats as seat_service
from graph.common import BillingSubscription
from graph.context import context_of
from graph.permissions import IsService, PermissionExtension
from graph.plan_changes import PreviewLine


@strawberry.type(description="What `setSeats` with the same count charges now.")
class SeatChangePreview:
    seats: int
    previous_seats: int
    currency: str = strawberry.field(description="ISO 4217, lower case.")
    amount_due: int = strawberry.field(
        description="The prorations invoiced now, in cents; negative: credited to the customer's balance."
    )
    proration_date: datetime | None = strawberry.field(
        description="When Stripe prorated the preview: `setSeats` given it charges exactly `amountDue`."
    )
    lines: list[PreviewLine] = strawberry.field(description="The proration lines (credit, then charge).")

    @classmethod
    def from_model(cls, preview: seat_service.SeatChangePreview) -> SeatChangePreview:
        return cls(
            seats=preview.seats,
            previous_seats=preview.previous_seats,
            currency=preview.currency,
            amount_due=preview.amount_due,
            proration_date=preview.proration_date,
            lines=[PreviewLine.from_model(line) for line in preview.lines],
        )


def _service_only() -> list[Any]:
    return [PermissionExtension(permissions=[IsService()])]


@strawberry.type
class SeatsMutation:
    @strawberry.mutation(
        description=(
            "An organisation's seat count (service key only; call it when membership changes). "
            "On a live per-seat subscription the plan's quantity changes with Stripe's prorations "
            "invoiced now; a retry with the same idempotencyKey changes nothing. Without one the "
            "count is kept for the next checkout. BAD_USER_INPUT outside the tier's min_seats.."
            "max_seats."
        ),
        extensions=_service_only(),
    )
    async def set_seats(
        self,
        info: strawberry.Info[Any, Any],
        org_id: strawberry.ID,
        seats: int,
        idempotency_key: str,
        proration_date: datetime | None = None,
    ) -> BillingSubscription:
        context = context_of(info)
        state = await seat_service.set_seats(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            catalog=context.catalog,
            clock=context.clock,
            org_id=str(org_id),
            seats=seats,
            key=idempotency_key,
            proration_date=proration_date,
        )
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.mutation(
        description=(
            "What `setSeats(orgId, seats)` would charge now, to the cent (service key only). "
            "NO_SUBSCRIPTION without a live per-seat subscription; BAD_USER_INPUT as for setSeats."
        ),
        extensions=_service_only(),
    )
    async def preview_seat_change(
        self, info: strawberry.Info[Any, Any], org_id: strawberry.ID, seats: int
    ) -> SeatChangePreview:
        context = context_of(info)
        preview = await seat_service.preview_seat_change(
            database=context.database,
            gateway=context.gateway,
            catalog=context.catalog,
            org_id=str(org_id),
            seats=seats,
        )
        return SeatChangePreview.from_model(preview)
