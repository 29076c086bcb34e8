"""A welcome email per sign-up, sent in the background with its status tracked: your own task
type on the library's email parts (`conveyor.jobs.email`), without the ready `/emails` service.

CONVEYOR_SMTP_URL=smtp://127.0.0.1:1025 uvicorn examples.welcome_emails:app
curl -X POST localhost:8000/signup -H 'content-type: application/json' \\
     -d '{"email": "ada@example.com", "name": "Ada"}'     → 202 {"task_id": …}
curl localhost:8000/signup/<task_id>                      → {"status": "sent", "smtp_reply": …}
curl localhost:8000/tasks/<task_id>/events                → the task's progress as it happens
"""

from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from conveyor import Conveyor, Settings, TaskContext, TaskStatus
from conveyor.errors import TaskNotFound
from conveyor.jobs.email import (
    Deferred,
    EmailInputError,
    SmtpPool,
    build_message,
    check_header,
    new_message_id,
    parse_smtp_url,
    valid_address,
)

settings = Settings()
SENDER = "welcome@example.com"
yard = Conveyor(settings)
pool = SmtpPool(parse_smtp_url(settings.smtp_url.get_secret_value()), size=2)


@yard.task(retries=3, retry_on=(Deferred,), concurrency=2, rate="10/s")
async def send_welcome(ctx: TaskContext, to: str, name: str, message_id: str) -> dict[str, Any]:
    """One welcome message; a 4xx reply or a lost connection is retried, a 5xx is final."""
    message = build_message(
        sender=SENDER,
        to=to,
        to_name=name,
        subject=f"Welcome, {name}",
        text=f"Hi {name},\n\nthanks for signing up.\n",
        html=None,
        message_id=message_id,  # made once: a resend after a crash carries the same id
    )
    accepted = await pool.send(message, sender=SENDER, recipient=to)
    return {"smtp_code": accepted.code, "smtp_reply": accepted.reply}


class SignUp(BaseModel):
    email: str = Field(max_length=320)
    name: str = Field(min_length=1, max_length=100)


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())  # /tasks/{id} and its SSE /events, for any client


@app.post("/signup", status_code=202)
async def signup(body: SignUp) -> dict[str, str]:
    try:
        address = valid_address(body.email, "email")
        name = check_header(body.name, "name")  # no CR, LF or NUL: no header injection
    except EmailInputError as exc:
        raise HTTPException(422, str(exc)) from exc
    handle = await send_welcome.submit(address, name, new_message_id("example.com"))
    return {"task_id": handle.id}


@app.get("/signup/{task_id}")
async def signup_status(task_id: str) -> dict[str, Any]:
    try:
        task = await yard.get(task_id)
    except TaskNotFound as exc:
        raise HTTPException(404, "no such sign-up") from exc
    status = {
        TaskStatus.QUEUED: "deferred" if task.error else "queued",
        TaskStatus.RUNNING: "sending",
        TaskStatus.COMPLETED: "sent",
        TaskStatus.FAILED: "failed",
        TaskStatus.CANCELLED: "cancelled",
    }[task.status]
    result = task.result if isinstance(task.result, dict) else {}
    return {
        "to": task.args["to"],
        "status": status,
        "attempts": task.attempts,
        "smtp_reply": result.get("smtp_reply") or (task.error or {}).get("message"),
    }
