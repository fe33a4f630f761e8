"""Unit tests of the activity layer: no database, no broker."""

from __future__ import annotations

import ast
import asyncio
import pickle
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest

import activities
import activities as activity
from activities import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_RETRY_POLICY,
    ActivityDefinition,
    ActivityDefinitionError,
    ActivityInfo,
    ApplicationError,
    Failure,
    InvalidPayloadError,
    InvalidRetryPolicyError,
    NotInActivityError,
    Outcome,
    PayloadError,
    PayloadTooLargeError,
    RetryPolicy,
    defn,
    execute,
    from_payload,
    get_definition,
    to_payload,
    validate_input,
)
from outbox.errors import OrchestratorError

# Models live at module level: hints of activities are resolved from the
# module's globals.


class Order(pydantic.BaseModel):
    order_id: str
    amount_cents: int


class Receipt(pydantic.BaseModel):
    order_id: str
    charged_cents: int
    idempotency_key: str


@dataclass
class Point:
    x: int
    y: int


class CardDeclined(ApplicationError):
    pass


class Opaque:
    """A type no type adapter can be built for."""


def make_info(**overrides: Any) -> ActivityInfo:
    now = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    values: dict[str, Any] = {
        "activity_id": "1",
        "activity_type": "charge",
        "workflow_id": "order-42",
        "workflow_type": "OrderSaga",
        "run_id": "run-1",
        "attempt": 1,
        "idempotency_key": "run-1:1",
        "task_queue": "activities",
        "scheduled_at": now,
        "started_at": now,
        "deadline": None,
    }
    values.update(overrides)
    return ActivityInfo(**values)


def failure_of(outcome: Outcome) -> Failure:
    assert not outcome.ok, outcome
    assert outcome.failure is not None
    return outcome.failure


# --- the public surface ------------------------------------------------------


def test_all_is_pinned() -> None:
    assert sorted(activities.__all__) == sorted(
        [
            "ActivityCancelledError",
            "defn",
            "info",
            "heartbeat",
            "in_activity",
            "ActivityInfo",
            "ActivityDefinition",
            "get_definition",
            "RetryPolicy",
            "DEFAULT_RETRY_POLICY",
            "ApplicationError",
            "ActivityDefinitionError",
            "InvalidRetryPolicyError",
            "NotInActivityError",
            "PayloadError",
            "InvalidPayloadError",
            "PayloadTooLargeError",
            "Failure",
            "Outcome",
            "execute",
            "to_payload",
            "from_payload",
            "validate_input",
            "DEFAULT_MAX_PAYLOAD_BYTES",
        ]
    )
    for name in activities.__all__:
        assert hasattr(activities, name), name


def test_errors_share_the_project_root_and_builtin_meanings() -> None:
    assert issubclass(ActivityDefinitionError, OrchestratorError)
    assert issubclass(ActivityDefinitionError, TypeError)
    assert issubclass(ApplicationError, OrchestratorError)
    assert issubclass(InvalidRetryPolicyError, ValueError)
    assert issubclass(NotInActivityError, RuntimeError)
    assert issubclass(PayloadError, ValueError)
    assert issubclass(PayloadError, OrchestratorError)
    assert issubclass(InvalidPayloadError, PayloadError)
    assert issubclass(PayloadTooLargeError, PayloadError)


def test_package_imports_only_allowed_layers() -> None:
    # The engine sits on top of this package; an import the other way would
    # be a cycle, and storage or messaging would make attempts untestable.
    forbidden = {"orchestrator", "events", "celery", "kombu", "sqlalchemy"}
    package = Path(activities.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                roots = {node.module.split(".")[0]}
                if roots == {"outbox"}:
                    assert node.module == "outbox.errors", source
            else:
                continue
            assert not roots & forbidden, (source.name, roots)


# --- RetryPolicy -------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.initial_interval == timedelta(seconds=1)
    assert policy.backoff_coefficient == 2.0
    assert policy.maximum_interval is None
    assert policy.maximum_attempts == 0
    assert policy.non_retryable_error_types == ()
    assert policy == DEFAULT_RETRY_POLICY


def test_retry_policy_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        RetryPolicy(timedelta(seconds=1))  # type: ignore[call-arg]
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.maximum_attempts = 3  # type: ignore[misc]


def test_backoff_doubles_up_to_hundred_times_initial() -> None:
    policy = RetryPolicy()
    delays = [policy.delay_after(attempt).total_seconds() for attempt in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 100, 100]


def test_backoff_respects_explicit_cap_and_coefficient() -> None:
    policy = RetryPolicy(
        initial_interval=timedelta(milliseconds=500),
        backoff_coefficient=3,
        maximum_interval=timedelta(seconds=10),
    )
    delays = [policy.delay_after(attempt).total_seconds() for attempt in range(1, 6)]
    assert delays == [0.5, 1.5, 4.5, 10, 10]


def test_backoff_with_coefficient_one_is_constant() -> None:
    policy = RetryPolicy(initial_interval=timedelta(seconds=3), backoff_coefficient=1)
    assert {policy.delay_after(attempt) for attempt in (1, 2, 50)} == {timedelta(seconds=3)}


def test_backoff_does_not_overflow_for_huge_attempts() -> None:
    policy = RetryPolicy(maximum_interval=timedelta(hours=1))
    assert policy.delay_after(10_000) == timedelta(hours=1)
    assert RetryPolicy().delay_after(10**9) == timedelta(seconds=100)


def test_backoff_treats_attempt_below_one_as_first() -> None:
    assert RetryPolicy().delay_after(0) == timedelta(seconds=1)


def test_should_retry_until_maximum_attempts() -> None:
    failure = Failure(type="ValueError", message="boom")
    policy = RetryPolicy(maximum_attempts=3)
    assert [policy.should_retry(attempt, failure) for attempt in (1, 2, 3, 4)] == [
        True,
        True,
        False,
        False,
    ]


def test_unlimited_attempts_retry_forever() -> None:
    failure = Failure(type="ValueError", message="boom")
    assert RetryPolicy().should_retry(10_000, failure)


def test_non_retryable_failure_flag_stops_retries() -> None:
    failure = Failure(type="ValueError", message="boom", non_retryable=True)
    assert not RetryPolicy().should_retry(1, failure)


def test_non_retryable_type_names_stop_retries() -> None:
    policy = RetryPolicy(non_retryable_error_types=("CardDeclined", "KeyError"))
    assert not policy.should_retry(1, Failure(type="CardDeclined", message="no"))
    assert not policy.should_retry(1, Failure(type="KeyError", message="'k'"))
    assert policy.should_retry(1, Failure(type="TimeoutError", message="slow"))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_interval": timedelta(0)}, "initial_interval must be positive"),
        ({"initial_interval": timedelta(seconds=-1)}, "initial_interval must be positive"),
        ({"initial_interval": 5}, "initial_interval must be a timedelta"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient must be at least 1"),
        ({"backoff_coefficient": float("nan")}, "backoff_coefficient must be at least 1"),
        ({"backoff_coefficient": "2"}, "backoff_coefficient must be a number"),
        (
            {"initial_interval": timedelta(seconds=5), "maximum_interval": timedelta(seconds=1)},
            "must not be shorter than initial_interval",
        ),
        ({"maximum_interval": 10}, "maximum_interval must be a timedelta"),
        ({"maximum_attempts": -1}, "maximum_attempts must be 0"),
        ({"maximum_attempts": 2.5}, "maximum_attempts must be an int"),
        ({"maximum_attempts": True}, "maximum_attempts must be an int"),
        ({"non_retryable_error_types": "KeyError"}, "sequence of type names"),
        ({"non_retryable_error_types": ("KeyError", 3)}, "non-empty type names"),
    ],
)
def test_invalid_retry_policies_are_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRetryPolicyError, match=fragment):
        RetryPolicy(**kwargs)


def test_retry_policy_normalises_lists_and_int_coefficients() -> None:
    policy = RetryPolicy(
        backoff_coefficient=2,
        non_retryable_error_types=["KeyError"],  # type: ignore[arg-type]
    )
    assert policy.non_retryable_error_types == ("KeyError",)
    assert isinstance(policy.backoff_coefficient, float)
    assert policy == RetryPolicy(non_retryable_error_types=("KeyError",))


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(
            initial_interval=timedelta(microseconds=123_457),
            backoff_coefficient=1.7,
            maximum_interval=timedelta(days=3, seconds=7, microseconds=1),
            maximum_attempts=7,
            non_retryable_error_types=("CardDeclined", "KeyError"),
        ),
    ],
)
def test_retry_policy_json_round_trip_is_exact(policy: RetryPolicy) -> None:
    data = policy.to_json()
    assert isinstance(data["initial_interval"], float)
    restored = RetryPolicy.from_json(data)
    assert restored == policy
    assert restored.to_json() == data


def test_retry_policy_json_form() -> None:
    policy = RetryPolicy(maximum_interval=timedelta(seconds=30), maximum_attempts=4)
    assert policy.to_json() == {
        "initial_interval": 1.0,
        "backoff_coefficient": 2.0,
        "maximum_interval": 30.0,
        "maximum_attempts": 4,
        "non_retryable_error_types": [],
    }


def test_retry_policy_from_json_fills_defaults_and_ignores_unknown_keys() -> None:
    restored = RetryPolicy.from_json({"maximum_attempts": 2, "added_later": True})
    assert restored == RetryPolicy(maximum_attempts=2)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"initial_interval": "1s"},
        {"initial_interval": None},
        {"maximum_interval": float("nan")},
        {"maximum_attempts": -3},
    ],
)
def test_retry_policy_from_bad_json_is_rejected(data: Any) -> None:
    with pytest.raises(InvalidRetryPolicyError):
        RetryPolicy.from_json(data)


# --- Failure -----------------------------------------------------------------


def raise_and_catch(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_failure_from_plain_exception() -> None:
    failure = Failure.from_exception(raise_and_catch(KeyError("missing")))
    assert failure.type == "KeyError"
    assert failure.message == "'missing'"
    assert failure.non_retryable is False
    assert failure.details is None
    assert failure.stack is not None
    assert "raise_and_catch" in failure.stack
    assert failure.cause is None


def test_failure_from_application_error() -> None:
    error = ApplicationError("declined", type="Card", non_retryable=True, details={"code": 51})
    failure = Failure.from_exception(error)
    assert failure.type == "Card"
    assert failure.message == "declined"
    assert failure.non_retryable is True
    assert failure.details == {"code": 51}
    # Never raised, so there is no traceback to keep.
    assert failure.stack is None


def test_application_error_type_defaults_to_class_name() -> None:
    assert ApplicationError("x").type == "ApplicationError"
    error = CardDeclined("insufficient funds")
    assert error.type == "CardDeclined"
    assert error.non_retryable is False
    assert error.details is None
    assert str(error) == "insufficient funds"
    assert Failure.from_exception(error).type == "CardDeclined"


def test_application_error_pickles_with_its_attributes() -> None:
    error = CardDeclined("no", type="Declined", non_retryable=True, details=[1, 2])
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, CardDeclined)
    assert (restored.message, restored.type, restored.non_retryable, restored.details) == (
        "no",
        "Declined",
        True,
        [1, 2],
    )


def test_payload_too_large_error_keeps_size_and_limit_when_pickled() -> None:
    error = pickle.loads(pickle.dumps(PayloadTooLargeError(300, 200)))
    assert (error.size, error.limit) == (300, 200)
    assert "300" in str(error)
    assert "200" in str(error)


def test_failure_follows_cause_one_level() -> None:
    def nested() -> None:
        try:
            try:
                raise OSError("disk")
            except OSError as inner:
                raise LookupError("lookup") from inner
        except LookupError as middle:
            raise ApplicationError("outer") from middle

    with pytest.raises(ApplicationError) as caught:
        nested()
    failure = Failure.from_exception(caught.value)
    assert failure.type == "ApplicationError"
    assert failure.cause is not None
    assert failure.cause.type == "LookupError"
    assert failure.cause.message == "lookup"
    assert failure.cause.cause is None
    assert failure.stack is not None
    # The cause's traceback is kept in the cause, not repeated in the stack.
    assert "OSError" not in failure.stack


def test_failure_truncates_long_stacks_keeping_the_end() -> None:
    with pytest.raises(RuntimeError) as caught:
        raise RuntimeError("a" * 20_000 + " the bottom")
    failure = Failure.from_exception(caught.value)
    assert failure.stack is not None
    assert len(failure.stack) < 8 * 1024 + 100
    assert failure.stack.startswith("[")
    assert "truncated" in failure.stack.splitlines()[0]
    assert failure.stack.rstrip().endswith("a the bottom")


def test_failure_survives_unstorable_details_and_broken_str() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    failure = Failure.from_exception(ApplicationError("x", details={"obj": object()}))
    assert failure.to_json()["details"]["unstorable_details"].startswith("{'obj'")
    assert Failure.from_exception(Unprintable()).message == "<unprintable Unprintable>"


def test_failure_json_round_trip() -> None:
    with pytest.raises(ApplicationError) as caught:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError as exc:
            raise ApplicationError("bad", details={"when": datetime(2024, 1, 1)}) from exc
    failure = Failure.from_exception(caught.value)
    data = failure.to_json()
    assert data["details"] == {"when": "2024-01-01T00:00:00"}
    assert data["cause"]["type"] == "ZeroDivisionError"
    assert Failure.from_json(data) == failure


def test_failure_is_frozen_and_rejects_bad_json() -> None:
    failure = Failure(type="X", message="y")
    with pytest.raises(pydantic.ValidationError):
        failure.message = "z"  # type: ignore[misc]
    with pytest.raises(InvalidPayloadError):
        Failure.from_json({"message": "no type"})


# --- payloads ----------------------------------------------------------------


def test_payload_round_trip_of_a_model() -> None:
    order = Order(order_id="o-1", amount_cents=1250)
    data = to_payload(order, Order)
    assert data == {"order_id": "o-1", "amount_cents": 1250}
    assert from_payload(data, Order) == order


def test_payload_round_trip_of_standard_types() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    data = to_payload({"when": when, "points": (Point(1, 2),)}, dict[str, Any])
    assert data == {"when": "2024-05-06T07:08:09Z", "points": [{"x": 1, "y": 2}]}
    assert from_payload(to_payload(when, datetime), datetime) == when
    assert from_payload([1, 2], tuple[int, ...]) == (1, 2)
    assert from_payload({"x": 1, "y": 2}, Point) == Point(1, 2)


def test_payload_with_any_passes_json_through() -> None:
    assert to_payload({"a": [1, "b", None]}) == {"a": [1, "b", None]}
    assert from_payload({"a": 1}) == {"a": 1}


def test_to_payload_accepts_raw_data_for_a_model() -> None:
    assert to_payload({"order_id": "o", "amount_cents": "5"}, Order) == {
        "order_id": "o",
        "amount_cents": 5,
    }


def test_to_payload_rejects_invalid_values() -> None:
    with pytest.raises(InvalidPayloadError, match="Order"):
        to_payload({"order_id": "o"}, Order)
    with pytest.raises(InvalidPayloadError):
        to_payload(object())
    with pytest.raises(InvalidPayloadError):
        to_payload("not a number", int)


def test_to_payload_enforces_the_size_limit() -> None:
    assert to_payload("x" * 8, limit=10) == "x" * 8  # 10 bytes with the quotes
    with pytest.raises(PayloadTooLargeError) as caught:
        to_payload("x" * 9, limit=10)
    assert (caught.value.size, caught.value.limit) == (11, 10)
    # Sizes are UTF-8 bytes, not characters.
    with pytest.raises(PayloadTooLargeError):
        to_payload("é" * 5, limit=11)
    assert DEFAULT_MAX_PAYLOAD_BYTES == 2 * 1024 * 1024
    with pytest.raises(PayloadTooLargeError):
        to_payload("x" * DEFAULT_MAX_PAYLOAD_BYTES)


def test_from_payload_error_names_the_type_and_the_problem() -> None:
    with pytest.raises(InvalidPayloadError) as caught:
        from_payload({"order_id": "o", "amount_cents": "lots"}, Order)
    message = str(caught.value)
    assert "Order" in message
    assert "amount_cents" in message
    with pytest.raises(InvalidPayloadError, match=r"list\[int\]"):
        from_payload(["a"], list[int])


def test_unsupported_payload_types_raise_payload_error() -> None:
    with pytest.raises(PayloadError, match="Opaque"):
        from_payload({}, Opaque)


def test_unhashable_type_expressions_still_work() -> None:
    from typing import Annotated

    tp = Annotated[int, pydantic.Field(ge=0), []]
    assert from_payload(3, tp) == 3
    with pytest.raises(InvalidPayloadError):
        from_payload(-1, tp)


def test_validate_input_accepts_instances_and_raw_data() -> None:
    order = Order(order_id="o", amount_cents=1)
    assert validate_input(order, Order) is order
    assert validate_input({"order_id": "o", "amount_cents": 1}, Order) == order
    with pytest.raises(InvalidPayloadError, match="Order"):
        validate_input({"order_id": "o"}, Order)
    assert validate_input({"anything": [1]}, Any) == {"anything": [1]}


# --- defn --------------------------------------------------------------------


@defn
def charge(order: Order) -> Receipt:
    return Receipt(
        order_id=order.order_id,
        charged_cents=order.amount_cents,
        idempotency_key=activity.info().idempotency_key,
    )


@activity.defn(name="refund-card", task_queue="payments", start_to_close=timedelta(seconds=30))
async def refund(order: Order) -> int:
    await asyncio.sleep(0)
    return order.amount_cents


@defn
def tick() -> None:
    return None


@defn
def untyped(value):  # type: ignore[no-untyped-def]
    return value


def test_defn_records_a_sync_activity() -> None:
    definition = get_definition(charge)
    assert isinstance(definition, ActivityDefinition)
    assert definition.name == "charge"
    assert definition.fn is charge
    assert definition.input_type is Order
    assert definition.output_type is Receipt
    assert definition.is_async is False
    assert definition.takes_input is True
    assert definition.task_queue == "activities"
    assert definition.retry_policy is None
    assert definition.start_to_close is None
    assert definition.schedule_to_close is None
    assert definition.heartbeat_timeout is None


def test_defn_with_options_on_an_async_activity() -> None:
    definition = get_definition(refund)
    assert definition.name == "refund-card"
    assert definition.is_async is True
    assert definition.input_type is Order
    assert definition.output_type is int
    assert definition.task_queue == "payments"
    assert definition.start_to_close == timedelta(seconds=30)


def test_defn_without_input_and_without_hints() -> None:
    no_input = get_definition(tick)
    assert no_input.takes_input is False
    assert no_input.input_type is None
    assert no_input.output_type is type(None)
    loose = get_definition(untyped)
    assert loose.takes_input is True
    assert loose.input_type is Any
    assert loose.output_type is Any


def test_defn_keeps_the_function_callable() -> None:
    order = Order(order_id="o", amount_cents=3)
    assert asyncio.run(refund(order)) == 3
    assert untyped(5) == 5  # type: ignore[no-untyped-call]


def test_defn_with_retry_policy_and_timeouts() -> None:
    policy = RetryPolicy(maximum_attempts=2)

    @defn(
        retry_policy=policy,
        schedule_to_close=timedelta(minutes=5),
        heartbeat_timeout=timedelta(seconds=10),
    )
    def step(value: int) -> int:
        return value

    definition = get_definition(step)
    assert definition.retry_policy is policy
    assert definition.schedule_to_close == timedelta(minutes=5)
    assert definition.heartbeat_timeout == timedelta(seconds=10)
    assert step(4) == 4


def test_parameter_annotated_none_is_distinct_from_no_parameter() -> None:
    def takes_none(value: None) -> None:
        return value

    definition = get_definition(defn(takes_none))
    assert definition.takes_input is True
    assert definition.input_type is type(None)


def two(a: int, b: int) -> int:
    return a + b


def with_default(a: int, b: int = 0) -> int:
    return a + b


def star_args(*args: int) -> int:
    return len(args)


def star_kwargs(**kwargs: int) -> int:
    return len(kwargs)


def keyword_only(*, a: int) -> int:
    return a


def generator(a: int) -> Any:
    yield a


@pytest.mark.parametrize("fn", [two, with_default, star_args, star_kwargs, keyword_only, generator])
def test_bad_signatures_are_rejected(fn: Any) -> None:
    with pytest.raises(ActivityDefinitionError, match=fn.__name__):
        defn(fn)
    assert not hasattr(fn, "__activity_definition__")


def test_non_functions_are_rejected() -> None:
    with pytest.raises(ActivityDefinitionError, match="plain def or async def"):
        defn(len)

    class Callable_:
        def __call__(self, value: int) -> int:
            return value

    with pytest.raises(ActivityDefinitionError):
        defn(Callable_())


def test_unresolvable_or_unusable_hints_are_rejected() -> None:
    def forward(value: Missing) -> int:  # type: ignore[name-defined]  # noqa: F821
        return 0

    with pytest.raises(ActivityDefinitionError, match="type hints"):
        defn(forward)

    def opaque(value: int) -> Opaque:
        return Opaque()

    with pytest.raises(ActivityDefinitionError, match="output type Opaque"):
        defn(opaque)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": ""}, "name"),
        ({"task_queue": ""}, "task_queue"),
        ({"retry_policy": {"maximum_attempts": 1}}, "retry_policy"),
        ({"start_to_close": timedelta(0)}, "start_to_close"),
        ({"heartbeat_timeout": 10}, "heartbeat_timeout"),
    ],
)
def test_invalid_options_are_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    def step(value: int) -> int:
        return value

    with pytest.raises(ActivityDefinitionError, match=fragment):
        defn(**kwargs)(step)


def test_get_definition_of_plain_function_explains() -> None:
    with pytest.raises(ActivityDefinitionError, match=r"two is not an activity.*@activity\.defn"):
        get_definition(two)


def test_get_definition_passes_definitions_through_and_resolves_names() -> None:
    definition = get_definition(charge)
    assert get_definition(definition) is definition
    assert get_definition("charge", registry={"charge": definition}) is definition
    with pytest.raises(ActivityDefinitionError, match="registry"):
        get_definition("charge")
    with pytest.raises(ActivityDefinitionError, match="nope"):
        get_definition("nope", registry={})


# --- context -----------------------------------------------------------------


def test_info_and_heartbeat_outside_an_activity_raise() -> None:
    assert activity.in_activity() is False
    with pytest.raises(NotInActivityError):
        activity.info()
    with pytest.raises(NotInActivityError):
        activity.heartbeat("progress")


# --- execute -----------------------------------------------------------------


def test_execute_success_with_models() -> None:
    info = make_info(idempotency_key="key-7")
    outcome = execute(get_definition(charge), info, {"order_id": "o-1", "amount_cents": 990})
    assert outcome.ok
    assert outcome.failure is None
    assert outcome.result == {"order_id": "o-1", "charged_cents": 990, "idempotency_key": "key-7"}
    assert activity.in_activity() is False


def test_execute_without_input_ignores_the_payload() -> None:
    outcome = execute(get_definition(tick), make_info(), {"ignored": True})
    assert outcome == Outcome(result=None)


def test_execute_async_activity_sees_info() -> None:
    @defn
    async def whoami() -> dict[str, Any]:
        await asyncio.sleep(0)
        current = activity.info()
        return {"workflow": current.workflow_id, "attempt": current.attempt}

    outcome = execute(get_definition(whoami), make_info(attempt=3), None)
    assert outcome.result == {"workflow": "order-42", "attempt": 3}


def test_execute_async_activity_from_inside_a_running_loop() -> None:
    async def main() -> Outcome:
        return execute(get_definition(refund), make_info(), {"order_id": "o", "amount_cents": 4})

    assert asyncio.run(main()) == Outcome(result=4)


def test_execute_application_error_becomes_failure() -> None:
    @defn
    def decline(order: Order) -> None:
        raise CardDeclined("declined", non_retryable=True, details={"order": order.order_id})

    outcome = execute(get_definition(decline), make_info(), {"order_id": "o", "amount_cents": 1})
    failure = failure_of(outcome)
    assert failure.type == "CardDeclined"
    assert failure.message == "declined"
    assert failure.non_retryable is True
    assert failure.details == {"order": "o"}
    assert failure.stack is not None
    assert "decline" in failure.stack
    assert not RetryPolicy().should_retry(1, failure)


def test_execute_plain_exception_is_retryable_failure() -> None:
    @defn
    def flaky(value: int) -> int:
        raise ConnectionError(f"refused {value}")

    failure = failure_of(execute(get_definition(flaky), make_info(), 5))
    assert failure.type == "ConnectionError"
    assert failure.message == "refused 5"
    assert failure.non_retryable is False
    assert RetryPolicy().should_retry(1, failure)


def test_execute_async_exception_is_failure() -> None:
    @defn
    async def broken() -> None:
        raise ValueError("async boom")

    failure = failure_of(execute(get_definition(broken), make_info(), None))
    assert (failure.type, failure.message) == ("ValueError", "async boom")


def test_execute_invalid_payload_is_non_retryable_failure() -> None:
    calls: list[Order] = []

    @defn
    def record(order: Order) -> None:
        calls.append(order)

    failure = failure_of(execute(get_definition(record), make_info(), {"order_id": "o"}))
    assert failure.type == "InvalidPayloadError"
    assert failure.non_retryable is True
    assert "Order" in failure.message
    assert calls == []


def test_execute_oversized_result_is_non_retryable_failure() -> None:
    @defn
    def big() -> str:
        return "x" * 100

    failure = failure_of(execute(get_definition(big), make_info(), None, limit=50))
    assert failure.type == "PayloadTooLargeError"
    assert failure.non_retryable is True
    assert "102" in failure.message


def test_execute_result_of_wrong_type_is_non_retryable_failure() -> None:
    @defn
    def wrong() -> int:
        return "not a number"  # type: ignore[return-value]

    failure = failure_of(execute(get_definition(wrong), make_info(), None))
    assert failure.type == "InvalidPayloadError"
    assert failure.non_retryable is True


def test_execute_heartbeats_reach_the_callback_as_json() -> None:
    seen: list[Any] = []

    @defn
    def progress(count: int) -> int:
        assert activity.in_activity()
        for index in range(count):
            activity.heartbeat({"done": index, "at": datetime(2024, 1, 1)})
        activity.heartbeat()
        return count

    outcome = execute(get_definition(progress), make_info(), 2, heartbeat=seen.append)
    assert outcome.result == 2
    assert seen == [
        {"done": 0, "at": "2024-01-01T00:00:00"},
        {"done": 1, "at": "2024-01-01T00:00:00"},
        None,
    ]


def test_execute_heartbeat_without_callback_is_accepted() -> None:
    @defn
    def beat() -> str:
        activity.heartbeat("half way")
        return "done"

    assert execute(get_definition(beat), make_info(), None).result == "done"


def test_execute_heartbeat_callback_can_stop_the_activity() -> None:
    class Cancelled(Exception):
        pass

    def cancel(details: Any) -> None:
        raise Cancelled(f"cancelled at {details}")

    @defn
    def long_running() -> None:
        activity.heartbeat(1)
        raise AssertionError("not reached")

    failure = failure_of(execute(get_definition(long_running), make_info(), None, heartbeat=cancel))
    assert (failure.type, failure.message) == ("Cancelled", "cancelled at 1")


def test_execute_exposes_previous_heartbeat_details() -> None:
    @defn
    def resume() -> Any:
        return activity.info().heartbeat_details

    outcome = execute(get_definition(resume), make_info(heartbeat_details={"page": 3}), None)
    assert outcome.result == {"page": 3}


def test_execute_lets_interrupts_through() -> None:
    @defn
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(get_definition(interrupted), make_info(), None)
    assert activity.in_activity() is False
