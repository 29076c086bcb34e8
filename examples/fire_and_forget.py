"""Start work and return at once (FastAPI's `BackgroundTasks` notification example, made durable).

uvicorn examples.fire_and_forget:app
curl -X POST localhost:8000/send-notification/ada@example.com
"""

from pathlib import Path

from fastapi import FastAPI

from conveyor import Conveyor, Settings, TaskContext

yard = Conveyor(Settings())


@yard.task(retries=2)
def write_notification(ctx: TaskContext, email: str, message: str = "") -> str:
    log = Path(yard.settings.data_dir) / "notifications.log"
    with log.open("a") as file:
        file.write(f"notification for {email}: {message}\n")
    return str(log)


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())


@app.post("/send-notification/{email}", status_code=202)
async def send_notification(email: str) -> dict[str, str]:
    handle = await write_notification.submit(email, message="some notification")
    return {"message": "Notification sent in the background", "task_id": handle.id}
