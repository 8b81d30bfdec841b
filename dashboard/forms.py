"""Forms: parse and validate what people type, with messages that say what to change.

Each form turns its cleaned data into the keyword arguments of a service
(`to_fields`); money typed in USD becomes integer micro-USD here, once.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.core.validators import RegexValidator
from django.utils import timezone

from accounts.models import (
    BudgetPeriod,
    Team,
    TeamRole,
    VirtualKey,
    alert_thresholds_check,
    timezone_check,
)
from accounts.services import PLATFORM_ROLES
from billing.webhooks import EVENT_TYPES as WEBHOOK_EVENT_TYPES
from gateway.destinations import api_base_problem
from gateway.models import RoutingStrategy
from gateway.services import FALLBACK_FIELDS, fallback_problem, money_to_micro

MAX_USD = Decimal("1000000000")


def usd_field(label: str, help_text: str = "") -> forms.DecimalField:
    return forms.DecimalField(
        label=label,
        required=False,
        min_value=Decimal(0),
        max_value=MAX_USD,
        decimal_places=6,
        help_text=help_text,
        widget=forms.NumberInput(attrs={"step": "0.01", "placeholder": "No limit"}),
    )


def limit_field(label: str, maximum: int = 10**12) -> forms.IntegerField:
    return forms.IntegerField(
        label=label,
        required=False,
        min_value=1,
        max_value=maximum,
        widget=forms.NumberInput(attrs={"placeholder": "No limit"}),
    )


def micro_to_usd(micro: int | None) -> Decimal | None:
    return None if micro is None else (Decimal(micro) / 1_000_000).normalize()


def parse_name_list(raw: str) -> list[str]:
    return list(
        dict.fromkeys(part.strip() for part in raw.replace("\n", ",").split(",") if part.strip())
    )


# --- teams ------------------------------------------------------------------------------------


class TeamForm(forms.Form):
    name = forms.CharField(max_length=200)
    budget_usd = usd_field("Budget (USD)", "Spend allowed per period. Empty: no budget.")
    budget_period = forms.ChoiceField(choices=BudgetPeriod.choices, initial=BudgetPeriod.MONTHLY)
    timezone = forms.CharField(
        max_length=64,
        initial="UTC",
        help_text="IANA name, e.g. Europe/Paris. Periods start at local midnight.",
    )
    alert_thresholds = forms.CharField(
        required=False,
        label="Alert thresholds (%)",
        help_text="Comma-separated percentages of the budget, e.g. 50, 80, 100.",
    )
    markup_percent = forms.DecimalField(
        label="Markup (%)",
        initial=Decimal(0),
        min_value=Decimal(-100),
        max_value=Decimal(1000),
        decimal_places=3,
        help_text="Added to list prices; negative for a discount.",
    )
    rpm_limit = limit_field("Requests per minute")
    tpm_limit = limit_field("Tokens per minute")
    sso_groups = forms.CharField(
        required=False,
        label="SSO groups",
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One IdP group per line, as `group = member` or `group = admin`. "
        "Its members get that role here at every SSO login and SCIM update.",
    )

    @classmethod
    def initial_for(cls, team: Team) -> dict[str, Any]:
        return {
            "sso_groups": "\n".join(f"{g} = {r}" for g, r in (team.sso_groups or {}).items()),
            "name": team.name,
            "budget_usd": micro_to_usd(team.budget_micro_usd),
            "budget_period": team.budget_period,
            "timezone": team.timezone,
            "alert_thresholds": ", ".join(str(t) for t in team.alert_thresholds or []),
            "markup_percent": team.markup_percent,
            "rpm_limit": team.rpm_limit,
            "tpm_limit": team.tpm_limit,
        }

    def clean_name(self) -> str:
        name = str(self.cleaned_data["name"]).strip()
        if not name:
            raise forms.ValidationError("Give the team a name.")
        return name

    def clean_timezone(self) -> str:
        return timezone_check(str(self.cleaned_data["timezone"]).strip())

    def clean_alert_thresholds(self) -> list[int]:
        values = []
        for part in parse_name_list(self.cleaned_data["alert_thresholds"] or ""):
            try:
                values.append(int(part.rstrip("%")))
            except ValueError:
                raise forms.ValidationError(f"'{part}' is not a whole percentage.") from None
        return alert_thresholds_check(values)

    def clean_sso_groups(self) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for line in str(self.cleaned_data["sso_groups"] or "").splitlines():
            if not line.strip():
                continue
            group, sep, role = line.rpartition("=")
            group, role = group.strip(), role.strip().lower()
            if not sep or not group or role not in ("member", "admin"):
                raise forms.ValidationError(
                    f"'{line.strip()}': write each line as `group = member` or `group = admin`."
                )
            mapping[group] = role
        return mapping

    def to_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "sso_groups": data["sso_groups"],
            "name": data["name"],
            "budget_micro_usd": money_to_micro(data["budget_usd"]),
            "budget_period": data["budget_period"],
            "timezone": data["timezone"],
            "alert_thresholds": data["alert_thresholds"],
            "markup_percent": data["markup_percent"],
            "rpm_limit": data["rpm_limit"],
            "tpm_limit": data["tpm_limit"],
        }


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150, label="Username")
    role = forms.ChoiceField(choices=TeamRole.choices, initial=TeamRole.MEMBER)


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=TeamRole.choices)


# --- keys -----------------------------------------------------------------------------------------


class KeyLimitsMixin(forms.Form):
    allowed_models = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every model.",
    )
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
        help_text="Empty: never (UTC).",
    )
    max_budget_usd = usd_field("Budget (USD)", "Spend allowed per period. Empty: no key budget.")
    budget_period = forms.ChoiceField(choices=BudgetPeriod.choices, initial=BudgetPeriod.MONTHLY)
    rpm_limit = limit_field("Requests per minute")
    tpm_limit = limit_field("Tokens per minute")

    LIMIT_FIELDS = ("allowed_models", "max_budget_usd", "budget_period", "rpm_limit", "tpm_limit")

    def setup(self, *, models: list[str], can_set_limits: bool) -> None:
        field = self.fields["allowed_models"]
        assert isinstance(field, forms.MultipleChoiceField)
        # Models no longer configured stay listed so that saving does not drop them silently.
        current = list(self.initial.get("allowed_models") or [])
        field.choices = [(m, m) for m in sorted(set(models) | set(current))]
        if not can_set_limits:
            for name in self.LIMIT_FIELDS:
                del self.fields[name]

    def clean_expires_at(self) -> datetime | None:
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now():
            raise forms.ValidationError("Pick a time in the future, or leave it empty.")
        return value

    def limit_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        fields: dict[str, Any] = {"expires_at": data.get("expires_at")}
        if "allowed_models" in self.fields:
            fields.update(
                allowed_models=list(data["allowed_models"]),
                max_budget_micro_usd=money_to_micro(data["max_budget_usd"]),
                budget_period=data["budget_period"],
                rpm_limit=data["rpm_limit"],
                tpm_limit=data["tpm_limit"],
            )
        return fields


class KeyIssueForm(KeyLimitsMixin):
    name = forms.CharField(max_length=200, help_text="What uses it, e.g. 'billing-service prod'.")
    team = forms.ModelChoiceField(queryset=Team.objects.none(), empty_label=None)

    field_order = ["name", "team"]

    def clean_name(self) -> str:
        name = str(self.cleaned_data["name"]).strip()
        if not name:
            raise forms.ValidationError("Give the key a name.")
        return name


class KeyEditForm(KeyLimitsMixin):
    name = forms.CharField(max_length=200)

    field_order = ["name"]

    @classmethod
    def initial_for(cls, key: VirtualKey) -> dict[str, Any]:
        return {
            "name": key.name,
            "allowed_models": list(key.allowed_models or []),
            "expires_at": key.expires_at,
            "max_budget_usd": micro_to_usd(key.max_budget_micro_usd),
            "budget_period": key.budget_period,
            "rpm_limit": key.rpm_limit,
            "tpm_limit": key.tpm_limit,
        }

    def clean_expires_at(self) -> datetime | None:
        value = self.cleaned_data.get("expires_at")
        if (
            value is not None
            and value <= timezone.now()
            and value != self.initial.get("expires_at")
        ):
            raise forms.ValidationError("Pick a time in the future, or leave it empty.")
        return value


class KeyPolicyForm(forms.Form):
    """A team's caps on the keys its members issue (team admins and platform admins)."""

    member_key_max_budget_usd = usd_field(
        "Max budget per key (USD)",
        "Per the team's budget period; members must set one. Empty: no cap.",
    )
    member_key_max_rpm = limit_field("Max requests per minute")
    member_key_max_tpm = limit_field("Max tokens per minute")
    member_key_allowed_models = forms.MultipleChoiceField(
        required=False,
        label="Models member keys may use",
        help_text="Members must limit their keys to these. None selected: no cap.",
    )
    member_key_max_lifetime_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=36500,
        label="Max key lifetime (days)",
        help_text="Members' keys must expire within this many days. Empty: no cap.",
    )

    @classmethod
    def initial_for(cls, team: Team) -> dict[str, Any]:
        return {
            "member_key_max_budget_usd": micro_to_usd(team.member_key_max_budget_micro_usd),
            "member_key_max_rpm": team.member_key_max_rpm,
            "member_key_max_tpm": team.member_key_max_tpm,
            "member_key_allowed_models": list(team.member_key_allowed_models or []),
            "member_key_max_lifetime_days": team.member_key_max_lifetime_days,
        }

    def setup(self, *, models: list[str]) -> None:
        field = self.fields["member_key_allowed_models"]
        assert isinstance(field, forms.MultipleChoiceField)
        current = list(self.initial.get("member_key_allowed_models") or [])
        field.choices = [(m, m) for m in sorted(set(models) | set(current))]

    def to_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "member_key_max_budget_micro_usd": money_to_micro(data["member_key_max_budget_usd"]),
            "member_key_max_rpm": data["member_key_max_rpm"],
            "member_key_max_tpm": data["member_key_max_tpm"],
            "member_key_allowed_models": list(data["member_key_allowed_models"]),
            "member_key_max_lifetime_days": data["member_key_max_lifetime_days"],
        }


GRACE_CHOICES = [
    ("0", "Immediately: the old secret stops working now"),
    ("3600", "After 1 hour"),
    ("86400", "After 24 hours"),
    ("604800", "After 7 days"),
]


class RotateForm(forms.Form):
    grace_seconds = forms.TypedChoiceField(
        choices=GRACE_CHOICES, coerce=int, initial="3600", label="Old secret keeps working"
    )


# --- models ---------------------------------------------------------------------------------------

_PRICE_HELP = "USD per 1M tokens. Empty: litellm's price list."


def price_field(label: str) -> forms.DecimalField:
    return forms.DecimalField(
        label=label,
        required=False,
        min_value=Decimal(0),
        max_digits=14,
        decimal_places=6,
        help_text=_PRICE_HELP,
        widget=forms.NumberInput(attrs={"step": "0.000001", "placeholder": "From price list"}),
    )


class DeploymentForm(forms.Form):
    name = forms.CharField(
        max_length=200, help_text="The public model name clients send, e.g. gpt-4o-mini."
    )
    provider_model = forms.CharField(
        max_length=300, help_text="provider/model, e.g. openai/gpt-4o-mini or anthropic/claude-…"
    )
    api_base = forms.CharField(
        max_length=500, required=False, label="API base URL", help_text="Empty: provider default."
    )
    api_key = forms.CharField(
        max_length=4000,
        required=False,
        label="Provider API key",
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    clear_api_key = forms.BooleanField(required=False, label="Remove the saved key")
    api_version = forms.CharField(max_length=64, required=False, label="API version")
    input_cost_per_million = price_field("Input price")
    output_cost_per_million = price_field("Output price")
    cached_input_cost_per_million = price_field("Cached input price")
    cache_write_cost_per_million = price_field("Cache write price")
    reasoning_cost_per_million = price_field("Reasoning price")
    context_length = limit_field("Context length (tokens)", 10**8)
    max_output_tokens = limit_field("Max output tokens", 10**8)
    rpm_limit = limit_field("Requests per minute")
    tpm_limit = limit_field("Tokens per minute")
    weight = forms.IntegerField(min_value=0, max_value=10**6, initial=1)
    priority = forms.IntegerField(required=False, min_value=0, max_value=10**6)
    timeout_seconds = forms.FloatField(
        required=False, min_value=0.1, max_value=3600, label="Timeout (s)"
    )
    drop_unsupported_params = forms.BooleanField(
        required=False, label="Drop parameters the provider does not support"
    )
    enabled = forms.BooleanField(required=False, initial=True)

    MODEL_FIELDS = (
        "name",
        "provider_model",
        "api_base",
        "api_version",
        "input_cost_per_million",
        "output_cost_per_million",
        "cached_input_cost_per_million",
        "cache_write_cost_per_million",
        "reasoning_cost_per_million",
        "context_length",
        "max_output_tokens",
        "rpm_limit",
        "tpm_limit",
        "weight",
        "priority",
        "timeout_seconds",
        "drop_unsupported_params",
        "enabled",
    )

    def __init__(self, *args: Any, has_api_key: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.has_api_key = has_api_key
        key = self.fields["api_key"]
        key.help_text = (
            "A key is saved. Type a new one to replace it; it is never shown again."
            if has_api_key
            else "Stored encrypted and never shown again."
        )
        if not has_api_key:
            del self.fields["clear_api_key"]

    @classmethod
    def initial_for(cls, deployment: Any) -> dict[str, Any]:
        return {name: getattr(deployment, name) for name in cls.MODEL_FIELDS}

    def clean_provider_model(self) -> str:
        from gateway.routing import provider_model_problem

        value = str(self.cleaned_data["provider_model"]).strip()
        problem = provider_model_problem(value)
        if problem:
            raise forms.ValidationError(problem)
        return value

    def clean_api_base(self) -> str:
        value = str(self.cleaned_data["api_base"] or "").strip()
        problem = api_base_problem(value)
        if problem:
            raise forms.ValidationError(problem)
        return value

    def to_fields(self, *, creating: bool) -> dict[str, Any]:
        data = self.cleaned_data
        fields = {name: data[name] for name in self.MODEL_FIELDS}
        fields["weight"] = data["weight"] if data["weight"] is not None else 1
        if data.get("api_key"):
            fields["api_key"] = data["api_key"]
        elif data.get("clear_api_key"):
            fields["api_key"] = ""
        if creating:
            fields = {k: v for k, v in fields.items() if v is not None}
        return fields


class GroupForm(forms.Form):
    routing_strategy = forms.ChoiceField(choices=RoutingStrategy.choices)
    fallbacks = forms.CharField(
        required=False,
        help_text="Models tried in order when this one fails, comma-separated.",
    )
    context_window_fallbacks = forms.CharField(
        required=False, help_text="Tried when the prompt is too long for this model."
    )
    content_policy_fallbacks = forms.CharField(
        required=False, help_text="Tried when the provider refuses the content."
    )
    num_retries = forms.IntegerField(min_value=0, max_value=10, initial=2)
    retry_backoff_seconds = forms.FloatField(min_value=0, max_value=60, initial=0.5)
    max_retry_after_seconds = forms.FloatField(min_value=0, max_value=600, initial=10)
    allowed_fails = forms.IntegerField(
        min_value=1, max_value=1000, initial=3, help_text="Failures in a row that open the circuit."
    )
    cooldown_seconds = forms.FloatField(min_value=0, max_value=3600, initial=10)

    LIST_FIELDS = FALLBACK_FIELDS

    def __init__(self, *args: Any, model: str, known: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = model
        self.known = set(known)

    @classmethod
    def initial_for(cls, group: Any) -> dict[str, Any]:
        if group is None:
            return {}
        data = {
            name: getattr(group, name)
            for name in (
                "routing_strategy",
                "num_retries",
                "retry_backoff_seconds",
                "max_retry_after_seconds",
                "allowed_fails",
                "cooldown_seconds",
            )
        }
        for name in cls.LIST_FIELDS:
            data[name] = ", ".join(getattr(group, name) or [])
        return data

    def _names(self, field: str) -> list[str]:
        names = parse_name_list(self.cleaned_data.get(field) or "")
        problem = fallback_problem(model=self.model, field=field, names=names, known=self.known)
        if problem:
            raise forms.ValidationError(problem)
        return names

    def clean_fallbacks(self) -> list[str]:
        return self._names("fallbacks")

    def clean_context_window_fallbacks(self) -> list[str]:
        return self._names("context_window_fallbacks")

    def clean_content_policy_fallbacks(self) -> list[str]:
        return self._names("content_policy_fallbacks")


class AliasForm(forms.Form):
    alias = forms.CharField(max_length=200, help_text="A new public name, e.g. gpt-4.")
    target = forms.ChoiceField(choices=[], help_text="The model it serves.")

    def __init__(self, *args: Any, targets: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["target"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(t, t) for t in targets]


# --- users ----------------------------------------------------------------------------------------


class UserCreateForm(forms.Form):
    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="At least 8 characters, not a common password.",
    )
    platform_role = forms.ChoiceField(choices=list(PLATFORM_ROLES.items()), required=False)


class PlatformRoleForm(forms.Form):
    platform_role = forms.ChoiceField(choices=list(PLATFORM_ROLES.items()), required=False)


# --- filters (GET) -------------------------------------------------------------------------------

RANGE_CHOICES = [
    ("period", "This period"),
    ("7d", "Last 7 days"),
    ("30d", "Last 30 days"),
    ("90d", "Last 90 days"),
]
MAX_RANGE_DAYS = 366


class OverviewFilter(forms.Form):
    team = forms.TypedChoiceField(
        coerce=int,
        required=False,
        empty_value=None,
        widget=forms.Select(attrs={"data-autosubmit": "", "aria-label": "Team"}),
    )
    range = forms.ChoiceField(choices=RANGE_CHOICES, required=False)

    def __init__(self, *args: Any, teams: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["team"]
        assert isinstance(field, forms.TypedChoiceField)
        field.choices = [("", "All teams"), *teams]


class UsageFilter(forms.Form):
    team = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)
    key = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
    model = forms.CharField(required=False, max_length=200)
    tag = forms.CharField(required=False, max_length=200)
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    group_by = forms.ChoiceField(
        required=False,
        choices=[
            ("", "Nothing"),
            ("model", "Model"),
            ("team", "Team"),
            ("key", "Key"),
            ("tag", "Tag"),
        ],
    )

    def __init__(self, *args: Any, teams: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["team"]
        assert isinstance(field, forms.TypedChoiceField)
        field.choices = [("", "All teams"), *teams]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since: date | None = data.get("since")
        until: date | None = data.get("until")
        if since and until:
            if since > until:
                self.add_error("until", "The end date is before the start date.")
            elif until - since > timedelta(days=MAX_RANGE_DAYS):
                self.add_error("since", f"Pick a range of at most {MAX_RANGE_DAYS} days.")
        return data


class RequestLogFilter(forms.Form):
    status = forms.ChoiceField(
        required=False,
        choices=[
            ("", "Any status"),
            ("success", "Success"),
            ("error", "Error"),
            ("partial", "Partial"),
            ("client_disconnected", "Client disconnected"),
        ],
    )
    model = forms.CharField(required=False, max_length=200)
    team = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)
    key = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def __init__(self, *args: Any, teams: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["team"]
        assert isinstance(field, forms.TypedChoiceField)
        field.choices = [("", "All teams"), *teams]


class AuditFilterForm(forms.Form):
    object_type = forms.ChoiceField(
        required=False,
        choices=[
            ("", "Everything"),
            ("team", "Teams"),
            ("virtualkey", "Keys"),
            ("membership", "Members"),
            ("modeldeployment", "Model deployments"),
            ("modelgroup", "Routing policies"),
            ("modelalias", "Aliases"),
            ("invoice", "Invoices"),
            ("webhookendpoint", "Webhook endpoints"),
            ("teamnotificationsettings", "Alert recipients"),
        ],
    )
    team = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)

    def __init__(self, *args: Any, teams: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["team"]
        assert isinstance(field, forms.TypedChoiceField)
        field.choices = [("", "All teams"), *teams]


# --- invoices ----------------------------------------------------------------------------------

MONTH_PATTERN = RegexValidator(r"^\d{4}-(0[1-9]|1[0-2])$", "Use a month as YYYY-MM, e.g. 2026-03.")
INVOICE_STATUSES = [("draft", "Draft"), ("finalized", "Finalized"), ("void", "Void")]


def month_field(**kwargs: Any) -> forms.CharField:
    return forms.CharField(
        max_length=7,
        validators=[MONTH_PATTERN],
        widget=forms.TextInput(attrs={"placeholder": "YYYY-MM", "inputmode": "numeric"}),
        **kwargs,
    )


class InvoiceFilterForm(forms.Form):
    team = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)
    status = forms.ChoiceField(required=False)
    period = month_field(required=False, label="Month")

    def __init__(
        self,
        *args: Any,
        teams: list[tuple[int, str]],
        statuses: list[tuple[str, str]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        team = self.fields["team"]
        assert isinstance(team, forms.TypedChoiceField)
        team.choices = [("", "All teams"), *teams]
        status = self.fields["status"]
        assert isinstance(status, forms.ChoiceField)
        status.choices = [("", "Any status"), *statuses]


class InvoiceDraftForm(forms.Form):
    team = forms.TypedChoiceField(coerce=int)
    month = month_field(help_text="A month that has ended in the team's timezone.")

    def __init__(self, *args: Any, teams: list[tuple[int, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        team = self.fields["team"]
        assert isinstance(team, forms.TypedChoiceField)
        team.choices = teams

    def year_month(self) -> tuple[int, int]:
        year, month = self.cleaned_data["month"].split("-")
        return int(year), int(month)


class InvoiceVoidForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "e.g. Wrong markup applied"}),
        help_text="Kept on the invoice. Only the team's latest finalized invoice can be voided.",
    )

    def clean_reason(self) -> str:
        reason = str(self.cleaned_data["reason"]).strip()
        if not reason:
            raise forms.ValidationError("Say why the invoice is voided.")
        return reason


# --- webhooks and alert recipients --------------------------------------------------------------


class WebhookForm(forms.Form):
    url = forms.CharField(
        max_length=2000,
        label="URL",
        help_text="http(s) on a public host. Each event is POSTed here as JSON, signed.",
        widget=forms.TextInput(attrs={"placeholder": "https://example.com/hooks/gateway"}),
    )
    events = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=[(event, event) for event in WEBHOOK_EVENT_TYPES],
        help_text="None ticked: every event, including types added later.",
    )
    description = forms.CharField(max_length=500, required=False)
    enabled = forms.BooleanField(
        required=False, initial=True, label="Enabled (deliveries are made)"
    )

    FIELDS = ("url", "events", "description", "enabled")

    def __init__(self, *args: Any, creating: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if creating:
            del self.fields["enabled"]

    @classmethod
    def initial_for(cls, endpoint: Any) -> dict[str, Any]:
        return {name: getattr(endpoint, name) for name in cls.FIELDS}

    def clean_url(self) -> str:
        return str(self.cleaned_data["url"]).strip()

    def to_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        fields = {
            "url": data["url"],
            "events": list(data["events"]),
            "description": data["description"].strip(),
        }
        if "enabled" in self.fields:
            fields["enabled"] = data["enabled"]
        return fields


class AlertRecipientsForm(forms.Form):
    alert_emails = forms.CharField(
        required=False,
        max_length=5000,
        label="Alert recipients",
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "ops@example.com"}),
        help_text="Email addresses, one per line or comma-separated. Budget alerts go here.",
    )

    def recipients(self) -> list[str]:
        return parse_name_list(self.cleaned_data.get("alert_emails") or "")
